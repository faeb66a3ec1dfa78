"""Step time and memory of keras-rdrop against plain Keras and a PyTorch R-Drop loop.

Every variant trains in its own fresh worker process. A driver process starts
the workers of one backend (plus the PyTorch loop workers, which live for the
whole run), and then runs them one at a time in interleaved rounds
(A B C D ... A B C D ...): in each round every worker trains one epoch of the
same fixed batches while the others wait, so slow drift of the machine hits all
variants alike. The first round(s) are warm-up (tracing, XLA compilation) and
are dropped. Ratios are taken per round between variants of the same round and
their median is reported.

Run `python benchmarks/bench.py --help` for the options and
`benchmarks/README.md` for the method and the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from rdrop_bench.config import (
    BACKENDS,
    DIAGNOSTIC_VARIANTS,
    HERE,
    KERAS_VARIANTS,
    LOOP_VARIANTS,
    MAIN_TABLE_MODELS,
    MODEL_NAMES,
    NO_LOOP_MODELS,
    QUICK_LOOPS,
    QUICK_VARIANTS,
    VARIANT_HELP,
    parse_variant,
    peer_of,
)
from rdrop_bench.driver import machine, resolve_python, run_model
from rdrop_bench.report import markdown
from rdrop_bench.sources import SOURCES, add_source, git_meta, parse_sources
from rdrop_bench.stats import merge_runs


def parse_args(argv=None):
    variants = "\n".join(f"  {k:<19} {v}" for k, v in VARIANT_HELP.items())
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"variants:\n{variants}\n\nexamples:\n"
        "  KERAS_BACKEND=jax python benchmarks/bench.py --quick\n"
        "  python benchmarks/bench.py --all-backends --model all\n",
    )
    parser.add_argument(
        "--model",
        choices=(*MODEL_NAMES, "all"),
        default=None,
        help="model to benchmark: mlp, transformer (hand-written), bert_tiny "
        "(keras-hub BertTextClassifier, BERT-tiny size, from config), lm50k "
        "(per-position logits over a 50,257 vocabulary, for memory), lora "
        "(keras-hub GPT2Backbone from config, LoRA rank 4, classification "
        "head; no PyTorch loop), or all "
        "(default: mlp and transformer; mlp with --quick)",
    )
    parser.add_argument(
        "--all-backends",
        action="store_true",
        help="run jax, tensorflow and torch (each from .tox/<backend>/bin/python "
        "when it exists) instead of only $KERAS_BACKEND",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends to run (default: $KERAS_BACKEND)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated Keras variants (default: all; with --quick: "
        + ",".join(QUICK_VARIANTS)
        + ")",
    )
    parser.add_argument(
        "--loops",
        default=None,
        help="comma-separated PyTorch loop variants, or 'none' (default: the "
        "peers of the Keras variants run; with --quick: " + ",".join(QUICK_LOOPS) + ")",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 min)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per round")
    parser.add_argument(
        "--skip-steps",
        type=int,
        default=None,
        help="untimed steps at the start of each round (cold caches after the "
        "switch between processes)",
    )
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument(
        "--sync-every-step",
        action="store_true",
        help="give every Keras variant a no-op on_train_batch_end callback, so "
        "fit waits for each step's logs on the main thread (as with verbose=1 "
        "or any batch-end callback, ReferenceKLRegularizer included); default: "
        "fit(verbose=0) with no batch-end callback (asynchronous on jax and torch)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="override the batch size (default: mlp 128, transformer 32, "
        "bert_tiny 32, lm50k 2, lora 4)",
    )
    parser.add_argument(
        "--processes",
        choices=("per-variant", "per-backend"),
        default=None,
        help="per-variant: a fresh process per variant, one fit call for all "
        "rounds, memory measured (default); per-backend: all variants of a "
        "backend in one process, one fit call per round, no memory (default "
        "with --quick: starts faster)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per worker: torch.set_num_threads, TF intra/inter-op "
        "threads, OMP/MKL env, XLA_FLAGS for JAX, and, below the core count, "
        "the worker pinned to that many cores (XLA ignores the rest). Default "
        "1: on a shared 2-core machine, multi-threaded runs stall when another "
        "process is busy",
    )
    parser.add_argument(
        "--jit",
        choices=("on", "auto", "off"),
        default="on",
        help="on: jit_compile=True on jax and tensorflow, eager on torch; "
        "auto: Keras' default (no XLA for TF on CPU); off: jit_compile=False",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="BACKEND=PATH",
        help="interpreter for a backend (jax, tensorflow, torch) or for the "
        "PyTorch loop (loop)",
    )
    parser.add_argument(
        "--out",
        default=str(HERE / "results"),
        help="folder for the JSON, the markdown table and the worker logs",
    )
    parser.add_argument("--tag", default=None, help="name of the result files")
    parser.add_argument(
        "--at-commit",
        default=None,
        metavar="REV",
        help="benchmark keras_rdrop/ as of a git revision (extracted with git "
        "archive) instead of the working tree, e.g. HEAD while it is being edited",
    )
    parser.add_argument(
        "--rdrop-src",
        action="append",
        default=[],
        metavar="LABEL=PATH_OR_REV",
        help="another keras_rdrop for the variants named NAME@LABEL: a folder "
        "holding keras_rdrop/ (another checkout) or a git revision (extracted "
        "with git archive); e.g. --rdrop-src before=751f1f1 --variants "
        "plain,anchor@before,anchor. Repeatable",
    )
    parser.add_argument(
        "--profile",
        choices=("pyinstrument", "cprofile"),
        default=None,
        help="profile the timed rounds of each worker (pyinstrument must be "
        "installed in each env; cprofile counts CPU time); timings are then "
        "distorted. Profiles go to <out>/logs/<tag>/profiles/",
    )
    parser.add_argument("--timeout", type=float, default=600, help="per message")
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="print the markdown tables of earlier result files and exit",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec["variants"][0] in LOOP_VARIANTS:
            from rdrop_bench.loop_worker import loop_worker as work
        else:
            from rdrop_bench.worker import keras_worker as work
        work(spec)
        return
    if args.report:
        run = merge_runs([json.loads(Path(path).read_text()) for path in args.report])
        text = markdown(run)
        print(text)
        if args.tag:
            out = Path(args.out)
            (out / f"{args.tag}.json").write_text(json.dumps(run, indent=1))
            (out / f"{args.tag}.md").write_text(text)
            print(f"results: {out / args.tag}.json\n         {out / args.tag}.md")
        return

    if args.all_backends:
        backends = list(BACKENDS)
    elif args.backends:
        backends = args.backends.split(",")
    else:
        backends = [os.environ.get("KERAS_BACKEND", "tensorflow")]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {BACKENDS}")
    args.backends = backends
    overrides = dict(item.split("=", 1) for item in args.python)
    multi = args.all_backends or len(backends) > 1
    args.pythons = {b: resolve_python(b, overrides, multi) for b in backends}
    # TensorFlow's XLA step is costed by the XLA that JAX ships (hlo_cost).
    args.cost_python = None
    if "tensorflow" in backends:
        try:
            args.cost_python = resolve_python("jax", overrides, True)
        except SystemExit:
            pass

    if args.processes is None:
        args.processes = "per-backend" if args.quick else "per-variant"
    if args.variants:
        args.variants = args.variants.split(",")
    else:
        args.variants = [
            v
            for v in (QUICK_VARIANTS if args.quick else KERAS_VARIANTS)
            if v not in DIAGNOSTIC_VARIANTS and not v.endswith("_unshared")
        ]
    if args.loops == "none":
        args.loop_variants = []
    elif args.loops:
        args.loop_variants = args.loops.split(",")
    elif args.quick:
        args.loop_variants = list(QUICK_LOOPS)
    else:
        peers = {peer_of(v) for v in args.variants}
        args.loop_variants = [v for v in LOOP_VARIANTS if v in peers]
    add_source(None, args.at_commit)
    for label, where in parse_sources(args.rdrop_src).items():
        add_source(label, where)
    for v in args.variants:
        source = parse_variant(v)["source"]
        if source not in SOURCES:
            raise SystemExit(
                f"variant {v!r}: no source @{source}; pass --rdrop-src {source}=..."
            )
    for v in args.loop_variants:
        if v not in LOOP_VARIANTS:
            raise SystemExit(f"unknown loop {v!r}; choose from {list(LOOP_VARIANTS)}")
    if args.model is None:
        models = ["mlp"] if args.quick else ["mlp", "transformer"]
    elif args.model == "all":
        models = list(MAIN_TABLE_MODELS)
    else:
        models = [args.model]
    if all(m in NO_LOOP_MODELS for m in models):
        # No PyTorch-loop peer of these models: no loop worker, no torch needed.
        args.loop_variants = []
    if args.loop_variants:
        args.pythons["loop"] = resolve_python("loop", overrides, multi)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = args.tag or f"{stamp}-{'-'.join(backends)}-{'-'.join(models)}" + (
        "-quick" if args.quick else ""
    )
    out = Path(args.out)
    log_dir = out / "logs" / tag
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "threads": args.threads,
            "jit": args.jit,
            "quick": args.quick,
            "processes": args.processes,
            "sync_every_step": args.sync_every_step,
            "profile": args.profile,
            "backends": backends,
            "pythons": args.pythons,
            "git": git_meta(),
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "results": [],
    }
    for model_name in models:
        run["results"].append(run_model(args, model_name, log_dir))
    run["meta"]["wall_s"] = time.perf_counter() - started
    versions = {}
    for result in run["results"]:
        for group in result["groups"]:
            for w in group["workers"]:
                versions[group["backend"]] = w["info"]["versions"]
        for w in result.get("loops", []):
            versions["loop"] = w["info"]["versions"]
    run["meta"]["versions"] = versions
    json_path = out / f"{tag}.json"
    md_path = out / f"{tag}.md"
    json_path.write_text(json.dumps(run, indent=1))
    text = markdown(run)
    md_path.write_text(text)
    print()
    print(text)
    print(f"total {run['meta']['wall_s']:.0f} s")
    print(f"results: {json_path}\n         {md_path}\nworker logs: {log_dir}")


if __name__ == "__main__":
    main()
