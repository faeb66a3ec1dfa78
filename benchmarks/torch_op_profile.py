"""Where a torch R-Drop step's time goes, op by op, against plain's.

`bench.py` times whole steps. This script runs one benchmark model
(`keras_models.py`) on torch, eagerly, for plain Keras `fit`, R-Drop in
`sequential` mode and R-Drop in `concat` mode, with `torch.profiler` on for
a few steps after a warm-up, and prints per op its self CPU time per step
and its calls per step in each variant: the ops whose time grows more than
their number of calls are where a step costs more than its work.

Example:

    KERAS_BACKEND=torch python benchmarks/torch_op_profile.py --model lora

It runs the keras_rdrop of this checkout. One thread
(`torch.set_num_threads(1)`), as the benchmark's workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
# The keras_rdrop of this checkout, whatever the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import torch  # noqa: E402
from keras_models import MODELS, build_keras_model, make_data  # noqa: E402

from keras_rdrop import RDropModel  # noqa: E402

VARIANTS = ("plain", "rdrop_seq", "rdrop_concat")


def profile(name: str, variant: str, steps: int) -> tuple[float, dict]:
    """`(wall ms per step, {op: (self CPU ms per step, calls per step)})`."""
    cfg = MODELS[name]
    x, y = make_data(name, cfg["batch_size"] * steps)
    keras.utils.set_random_seed(0)
    model = build_keras_model(name)
    if variant != "plain":
        mode = "concat" if variant == "rdrop_concat" else "sequential"
        model = RDropModel(model, alpha=1.0, mode=mode)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    fit = dict(batch_size=cfg["batch_size"], epochs=1, verbose=0, shuffle=False)
    model.fit(x, y, **fit)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        start = time.perf_counter()
        model.fit(x, y, **fit)
        wall = (time.perf_counter() - start) / steps * 1e3
    ops = {
        e.key: (e.self_cpu_time_total / 1e3 / steps, e.count / steps)
        for e in p.key_averages()
    }
    return wall, ops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lora", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=4, help="profiled steps")
    parser.add_argument("--top", type=int, default=25, help="ops to print")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "torch":
        raise SystemExit("torch_op_profile.py profiles torch: set KERAS_BACKEND=torch")
    torch.set_num_threads(1)
    results = {}
    for variant in VARIANTS:
        wall, ops = profile(args.model, variant, args.steps)
        results[variant] = ops
        total = sum(ms for ms, _ in ops.values())
        print(f"{variant}: {wall:.1f} ms/step wall (profiled), {total:.1f} ms self CPU")
    seq, plain, concat = (results[v] for v in ("rdrop_seq", "plain", "rdrop_concat"))
    print(
        f"\n{'op':<40} {'plain ms':>9} {'seq ms':>9} {'concat ms':>9} "
        f"{'seq/plain':>9} {'calls seq/plain':>16}"
    )
    for op in sorted(seq, key=lambda k: -seq[k][0])[: args.top]:
        p_ms, p_n = plain.get(op, (0.0, 0.0))
        s_ms, s_n = seq[op]
        c_ms = concat.get(op, (0.0, 0.0))[0]
        time_ratio = f"{s_ms / p_ms:.2f}" if p_ms else "—"
        print(
            f"{op[:40]:<40} {p_ms:9.1f} {s_ms:9.1f} {c_ms:9.1f} {time_ratio:>9} "
            f"{s_n:>8.0f}/{p_n:<7.0f}"
        )


if __name__ == "__main__":
    main()
