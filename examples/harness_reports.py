"""Tables and figures of the keras-rdrop examples (see `harness.py`).

- `report_sweep` chooses each arm's epoch and R-Drop's alpha on validation
  only (`harness.summarize`), then writes the accuracy table, the alpha
  sensitivity rows and two figures.
- `anchor_markdown` and `anchor_figure` draw a forgetting trade-off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness import commit_stamp, figures_dir, summarize

# -------------------------------------------------------------------- reports


def mean_std(values, scale=1.0, digits=2, signed=False):
    import numpy as np

    values = np.asarray(values, "float64") * scale
    sign = "+" if signed else ""
    mean = f"{values.mean():{sign}.{digits}f}"
    if len(values) < 2:
        return mean
    return f"{mean} ± {values.std(ddof=1):.{digits}f}"


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


# Two-sided 5% critical values of Student's t, by degrees of freedom.
_T_CRITICAL = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t_critical(df: int) -> float:
    """The two-sided 5% critical value of a paired t over `df + 1` seeds
    (a larger, more cautious value between the tabulated ones)."""
    if df < 1:
        return float("inf")
    known = [k for k in _T_CRITICAL if k <= df]
    return _T_CRITICAL[max(known)] if df <= 30 else 1.96


def _wins(row, seeds):
    text = f"{row['wins']}/{seeds}"
    if row["ties"]:
        text += f" ({row['ties']} tied)"
    return text


def _step_ms(row):
    import numpy as np

    if np.all(np.isnan(row["step_seconds"])):
        return ""
    return mean_std(row["step_seconds"], 1000, digits=0)


def sweep_markdown(results, title, setup):
    """The accuracy table and the alpha sensitivity rows, in markdown."""
    rows, chosen, seeds = results["rows"], results["chosen_alpha"], results["seeds"]
    base, best = rows[0.0], rows[chosen]
    diff_acc = best["diff_accuracy"].mean() * 100
    diff_nll = best["diff_nll"].mean()
    spread = best["diff_accuracy"].std(ddof=1) * 100 if seeds > 1 else 0.0
    t = diff_acc / (spread / seeds**0.5) if spread > 0 else None
    clear = t is not None and abs(t) > t_critical(seeds - 1)
    t_text = ""
    if t is not None:
        p_text = "p < 0.05" if clear else "p ≥ 0.05"
        t_text = f" (paired t = {t:.1f} over {seeds} seeds, {p_text})"
    if clear and diff_acc > 0:
        verdict = "R-Drop beats the baseline here"
    elif clear and diff_acc < 0:
        verdict = "R-Drop does worse than the baseline here"
    else:
        # Too few seeds, or a difference the seeds disagree on: a rerun on
        # another CPU may flip its sign, so it is not presented as a finding.
        verdict = "The difference is within the seed noise here"
    head_rows = []
    for name, row, is_base in (
        ("baseline (alpha = 0)", base, True),
        (f"R-Drop (alpha = {chosen:g})", best, False),
    ):
        head_rows.append(
            [
                name,
                row["epoch"] + 1,
                mean_std(row["test_accuracy"], 100),
                mean_std(row["test_nll"], digits=3),
                "" if is_base else mean_std(row["diff_accuracy"], 100, signed=True),
                "" if is_base else mean_std(row["diff_nll"], digits=3, signed=True),
                "" if is_base else _wins(row, seeds),
                mean_std(row["epoch_seconds"], digits=3),
                _step_ms(row),
            ]
        )
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
            "train step (ms)",
        ],
        head_rows,
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
                _step_ms(row),
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
            "train step (ms)",
        ],
        sweep_rows,
    )
    return (
        f"### {title}\n\n"
        f"{setup}\n\n"
        f"{head}\n\n"
        f"{verdict}: {diff_acc:+.2f} points of test accuracy{t_text} and "
        f"{diff_nll:+.3f} test NLL on average; R-Drop "
        f"has the better test accuracy on {_wins(best, seeds)} seeds. Values are "
        "mean ± std over seeds; a difference (Δ) is R-Drop minus the baseline "
        "on the same seed; epoch is the one chosen on validation. Train time "
        "per epoch is the median over epochs after the first (which compiles); "
        "a train step is that time over the steps of an epoch.\n\n"
        "#### Sensitivity to alpha\n\n"
        f"{sweep}\n"
    )


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, curves, label, color, style="-"):
    import numpy as np

    curves = np.asarray(curves, "float64")
    if curves.size == 0 or curves.ndim != 2:
        return
    epochs = np.arange(1, curves.shape[1] + 1)
    mean = curves.mean(axis=0)
    ax.plot(epochs, mean, style, color=color, label=label, marker=".")
    if curves.shape[0] > 1:
        std = curves.std(axis=0, ddof=1)
        ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2)


def sweep_figures(runs, results, out, prefix, title):
    """Learning curves (baseline vs chosen alpha) and the alpha sweep, as PNG."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, chosen, seeds = results["rows"], results["chosen_alpha"], results["seeds"]

    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for alpha, label, color in (
        (0.0, "baseline (alpha = 0)", "tab:gray"),
        (chosen, f"R-Drop (alpha = {chosen:g})", "tab:blue"),
    ):
        _band(ax_acc, [100 * r["val_accuracy"] for r in runs[alpha]], label, color)
        ax_acc.axvline(rows[alpha]["epoch"] + 1, color=color, ls=":", lw=1)
        _band(ax_kl, [r["dropout_kl"] for r in runs[alpha]], label, color)
    _band(
        ax_kl,
        [r["kl_loss"] for r in runs[chosen]],
        f"R-Drop's kl_loss, training log (alpha = {chosen:g})",
        "tab:blue",
        "--",
    )
    for ax in (ax_acc, ax_kl):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy (%)")
    ax_acc.set_title("Validation accuracy (dotted: epoch chosen)", fontsize=10)
    ax_kl.set(xlabel="epoch", ylabel="symmetric KL between two dropout passes")
    ax_kl.set_yscale("log")
    ax_kl.set_title("Disagreement of two dropout passes, training data", fontsize=10)
    for ax in (ax_acc, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: mean ± std over {seeds} seeds")
    fig.tight_layout()
    curves_path = out / f"{prefix}_learning_curves.png"
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
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    sweep_path = out / f"{prefix}_alpha_sweep.png"
    fig.savefig(sweep_path, dpi=110)
    plt.close(fig)
    return [curves_path, sweep_path]


def report_sweep(args, runs, title, setup, figure_prefix, curve_title):
    """Summarizes a paired alpha sweep: tables, figures, `--results` file."""
    results = summarize(runs)
    results["runs"] = runs
    results["setup"] = f"{setup} Commit {commit_stamp()}."
    results["figures"] = sweep_figures(
        runs, results, figures_dir(args), figure_prefix, curve_title
    )
    results["markdown"] = sweep_markdown(results, title, results["setup"])
    if args.results:
        Path(args.results).write_text(results["markdown"] + "\n")
    return results


def print_and_save(table: str, start: float, results: str | None) -> None:
    """Prints a table and the wall time since `start`; `--results` saves both.

    `start` is a `time.perf_counter()` reading.
    """
    text = f"{table}\n\nwall time {time.perf_counter() - start:.0f} s"
    print()
    print(text, flush=True)
    if results:
        Path(results).write_text(text + "\n")


def print_results(results):
    """Prints a script's tables and where its files went; returns `results`."""
    print()
    print(results["markdown"])
    for path in results["figures"]:
        print(f"Figure written: {path}")
    return results


# --------------------------------------------------------- anchor trade-off


def save_json(path, value):
    """Writes `value` (dicts, lists, NumPy arrays and scalars) as JSON."""
    import numpy as np

    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        return v

    Path(path).write_text(json.dumps(plain(value)))


def anchor_markdown(results, title, names):
    """The forgetting table: kept and learned accuracy at every beta.

    Args:
        results: `{"before": [{"kept", "learned"} per seed], "finetuned":
            {beta: [run per seed]}, "setup": str}`; a run holds per-epoch
            arrays `kept` and `learned` (accuracies), optionally `drift`
            (a KL to the starting model on the kept task's texts), and
            `ref_kl` and `step_seconds`.
        title: The section title.
        names: Column names: `kept`, `learned`, `before` (the starting model's
            row), and `drift` if the runs have it.
    """
    import numpy as np

    before_kept = np.array([s["kept"] for s in results["before"]])
    before_learned = np.array([s["learned"] for s in results["before"]])
    runs = next(iter(results["finetuned"].values()))
    has_drift = bool(runs) and "drift" in runs[0]
    has_step = bool(runs) and "step_seconds" in runs[0]
    first = [names["before"], "", mean_std(before_kept, 100, 1)]
    first += [mean_std(before_learned, 100, 1), "", ""]
    first += [""] * (1 + has_drift + has_step)
    rows = [first]
    for beta, arm in results["finetuned"].items():
        kept = np.array([r["kept"][-1] for r in arm])
        learned = np.array([r["learned"][-1] for r in arm])
        row = [
            "plain fine-tuning" if beta == 0 else "with ReferenceKLRegularizer",
            f"{beta:g}",
            mean_std(kept, 100, 1),
            mean_std(learned, 100, 1),
            mean_std(kept - before_kept, 100, 1, signed=True),
            mean_std(learned - before_learned, 100, 1, signed=True),
        ]
        if has_drift:
            row.append(mean_std([r["drift"][-1] for r in arm], digits=4))
        row.append("" if beta == 0 else mean_std([r["ref_kl"] for r in arm], digits=3))
        if has_step:
            row.append(mean_std([r["step_seconds"] for r in arm], 1000, digits=0))
        rows.append(row)
    headers = [
        "model",
        "beta",
        names["kept"],
        names["learned"],
        "change on kept task (points)",
        "change on new task (points)",
    ]
    if has_drift:
        headers.append(names["drift"])
    headers.append("ref_kl, last epoch")
    if has_step:
        headers.append("train step (ms)")
    return (
        f"### {title}\n\n"
        f"{results['setup']} Commit {commit_stamp()}.\n\n"
        f"{markdown_table(headers, rows)}\n\n"
        "Values are mean ± std over seeds; a change is against the same seed's "
        "starting model (the first row). `ref_kl` is the logged KL(model || "
        "starting model) on the fine-tuning batches. Pick `beta` for the "
        "trade-off you need, on a validation split of your own data.\n"
    )


def anchor_figure(results, out, filename, names, title):
    """Kept vs learned at every beta, and the kept accuracy per epoch (PNG)."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    finetuned = results["finetuned"]
    betas = list(finetuned)

    def stats(values):
        values = 100 * np.asarray(values, "float64")
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        return values.mean(), std

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 4.4))
    points = []
    for beta in betas:
        ox, sx = stats([r["learned"][-1] for r in finetuned[beta]])
        oy, sy = stats([r["kept"][-1] for r in finetuned[beta]])
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
    px, psx = stats([s["learned"] for s in results["before"]])
    py, psy = stats([s["kept"] for s in results["before"]])
    ax_t.errorbar(
        px, py, xerr=psx, yerr=psy, fmt="*", ms=12, color="tab:red", capsize=3
    )
    ax_t.annotate(
        "before fine-tuning",
        (px, py),
        textcoords="offset points",
        xytext=(0, 9),
        ha="center",
        fontsize=8,
        color="tab:red",
    )
    ax_t.margins(0.08)
    ax_t.set(xlabel=names["learned"], ylabel=names["kept"])
    ax_t.set_title("Kept vs learned after fine-tuning (mean ± std)", fontsize=10)
    ax_t.grid(alpha=0.3)

    cmap = plt.get_cmap("viridis")
    for i, beta in enumerate(betas):
        curves = 100 * np.array([r["kept"] for r in finetuned[beta]])
        epochs = np.arange(0, curves.shape[1] + 1)
        mean = np.concatenate([[py], curves.mean(axis=0)])
        color = "tab:gray" if beta == 0 else cmap(i / max(len(betas) - 1, 1))
        ax_e.plot(
            epochs,
            mean,
            "-",
            marker=".",
            color=color,
            label="no anchor" if beta == 0 else f"{beta:g}",
        )
    ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_e.set(xlabel="fine-tuning epoch", ylabel=names["kept"])
    ax_e.set_title("Forgetting during fine-tuning (mean over seeds)", fontsize=10)
    ax_e.legend(title="beta", fontsize=8)
    ax_e.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = out / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
