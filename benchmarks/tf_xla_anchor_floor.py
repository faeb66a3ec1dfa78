"""What the anchor's step costs at least on TensorFlow + XLA (CPU), on lm50k.

`bench.py --model lm50k --variants plain,anchor` measures the whole Keras
step. This script takes the step apart to show where the anchor's time goes
and how low it can go: the lm50k output layer (`Dense(50257)` on 2 x 512
positions of width 32, the part of the model where the anchor's work is)
trained one step with `tf.GradientTape` under `jit_compile=True`, in these
variants, timed side by side in interleaved rounds on one thread:

- `plain`: Keras' `SparseCategoricalCrossentropy(from_logits=True)`, the
  plain step;
- `reference_only`: plain plus the reference's forward pass, whose output is
  used for nothing but a scalar: the anchor's cost before any KL;
- `reference_lse`: `reference_only` plus one log-sum-exp over the reference's
  logits, which any exact KL to the reference needs;
- `anchor_log_softmax`: a TensorFlow transcription of the anchor's pass
  before `logsumexp_reference_kl` (`cross_entropy_and_reference_kl` at e5bbc9b:
  log-softmaxes, the two gradient terms kept for the backward pass);
- `anchor`: the anchor's pass as RDropModel runs it on TensorFlow + XLA
  (`keras_rdrop.src.logsumexp_reference_kl`).

It prints CPU ms per step and each variant's ratio to `plain` (medians over
rounds). TensorFlow only: the question it answers is specific to XLA:CPU,
which writes the input of every reduction to memory.

Example:

    KERAS_BACKEND=tensorflow python benchmarks/tf_xla_anchor_floor.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log_softmax_anchor(x, r, labels):
    """The log-softmax formulation (before `logsumexp_reference_kl`), one pass."""
    import tensorflow as tf

    num_classes = x.shape[-1]

    @tf.custom_gradient
    def op(x):
        log_p = tf.nn.log_softmax(x, -1)
        log_r = tf.nn.log_softmax(r, -1)
        p = tf.exp(log_p)
        ce = -tf.gather(log_p, labels, batch_dims=2)
        d = log_p - log_r
        kl = tf.reduce_sum(p * d, -1)
        ce_term = p - tf.one_hot(labels, num_classes)
        kl_term = p * (d - kl[..., None])

        def grad(up):
            return up[0][..., None] * ce_term + up[1][..., None] * kl_term

        return tf.stack([ce, kl]), grad

    return op(x)


def build_steps(width: int, vocabulary: int, positions: tuple):
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_rdrop.src.logsumexp_reference_kl import reference_kl_from_logsumexp

    rng = np.random.default_rng(0)
    h = tf.constant(rng.normal(size=positions + (width,)).astype("float32"))
    labels = tf.constant(rng.integers(0, vocabulary, size=positions).astype("int32"))
    kernel = tf.Variable(rng.normal(size=(width, vocabulary)).astype("float32") * 0.1)
    bias = tf.Variable(np.zeros(vocabulary, "float32"))
    kernel_0, bias_0 = tf.constant(kernel.numpy()), tf.constant(bias.numpy())
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def logits(k, b):
        return tf.einsum("bth,hv->btv", h, k) + b

    def anchored(fused):
        def loss(x, y, r):
            values = fused(x, r, y)
            return tf.reduce_mean(values[0]) + tf.reduce_mean(values[1])

        return loss

    losses = {
        "plain": lambda x, y, r: cross_entropy(y, x),
        "reference_only": lambda x, y, r: (
            cross_entropy(y, x) + 0.0 * tf.reduce_mean(r[..., :1])
        ),
        "reference_lse": lambda x, y, r: (
            cross_entropy(y, x) + 0.0 * tf.reduce_mean(tf.reduce_logsumexp(r, -1))
        ),
        "anchor_log_softmax": anchored(log_softmax_anchor),
        "anchor": anchored(lambda x, r, y: reference_kl_from_logsumexp(x, r, y, "kl")),
    }

    def step(loss_fn, with_reference):
        def run():
            r = tf.stop_gradient(logits(kernel_0, bias_0)) if with_reference else None
            with tf.GradientTape() as tape:
                loss = loss_fn(logits(kernel, bias), labels, r)
            grads = tape.gradient(loss, [kernel, bias])
            return loss, tf.add_n([tf.reduce_sum(g) for g in grads])

        return tf.function(run, jit_compile=True)

    return {name: step(fn, name != "plain") for name, fn in losses.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per round")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT))
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    steps = build_steps(32, 50257, (2, 512))
    for name, step in steps.items():  # compile
        print(f"compiling {name} ...", flush=True)
        step()[1].numpy()
    times = {name: [] for name in steps}
    for i in range(args.rounds):
        for name, step in steps.items():
            start = time.process_time()
            for _ in range(args.steps):
                step()[1].numpy()
            times[name].append((time.process_time() - start) / args.steps * 1000)
        print(f"round {i + 1}/{args.rounds} done", flush=True)
    plain = times["plain"]
    print(
        f"\nlm50k output layer, TensorFlow {tf.__version__} + XLA, one thread, "
        f"{args.rounds} interleaved rounds of {args.steps} steps; CPU ms/step and "
        "the median of per-round ratios to plain\n"
    )
    print("| variant | CPU ms/step | × plain |\n|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(v / p for v, p in zip(values, plain))
        print(f"| {name} | {statistics.median(values):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
