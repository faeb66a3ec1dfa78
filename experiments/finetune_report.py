"""Tables and the figure of the fine-tuning protocol, from its JSON runs.

Reads every `TASK-sSEED-aALPHA.json` under `--runs-dir` (written by
`finetune_text.py`), and writes:

- `experiments/results/finetune.md`: per task, R-Drop (alpha chosen per seed
  on validation) against the baseline of the same seed: accuracy difference
  (points) with its standard deviation over seeds, wins, the paired t-test
  and sign-test p-values, the NLL and ECE differences, the steps and the
  training wall time to the best epoch; each fixed alpha; a summary row;
- `experiments/results/finetune.json`: the same numbers, read by the docs'
  numbers table (`tools/numbers_table.py`);
- `docs/figures/finetune_delta.png`: each task's paired difference with its
  spread, the whole encoder fine-tuned beside a head on the frozen encoder
  (`experiments/results/frozen_encoder.json`).

Only seeds whose every arm has finished are counted. Nothing here is
edited by hand: rerun this script after the runs change.

    python experiments/finetune_report.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import text_data  # noqa: E402

RUNS_DIR = HERE / "results" / "finetune" / "runs"
OUT_MD = HERE / "results" / "finetune.md"
OUT_JSON = HERE / "results" / "finetune.json"
FIGURE = ROOT / "docs" / "figures" / "finetune_delta.png"
FROZEN = HERE / "results" / "frozen_encoder.json"


def load_runs(runs_dir: Path) -> dict:
    """`{task: {seed: {alpha: record}}}`."""
    runs: dict = {}
    for path in sorted(runs_dir.glob("*.json")):
        record = json.loads(path.read_text())
        task = runs.setdefault(record["task"], {})
        task.setdefault(record["seed"], {})[float(record["alpha"])] = record
    return runs


def choose(arms: dict) -> float:
    """R-Drop's alpha for one seed: best validation accuracy, then NLL."""
    rdrop = {a: r for a, r in arms.items() if a > 0}
    return max(
        rdrop, key=lambda a: (rdrop[a]["best_val_accuracy"], -rdrop[a]["best_val_nll"])
    )


def _mean_std(values) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize_task(seeds: dict) -> dict | None:
    alphas = sorted(set().union(*[set(a) for a in seeds.values()]))
    complete = {s: arms for s, arms in seeds.items() if set(arms) == set(alphas)}
    if not complete or 0.0 not in alphas or len(alphas) < 2:
        return None
    rows, chosen = [], []
    for seed in sorted(complete):
        arms = complete[seed]
        alpha = choose(arms)
        chosen.append(alpha)
        rows.append((arms[0.0], arms[alpha]))

    def delta(key, scale=1.0):
        return [scale * (r[key] - b[key]) for b, r in rows]

    def per_step(r):
        return r["train_cpu_seconds"] / (r["epochs_run"] * r["steps_per_epoch"])

    acc = delta("test_accuracy", 100.0)
    tests = text_data.paired_tests(acc)
    fixed = {}
    for alpha in alphas[1:]:
        d = [
            100.0
            * (complete[s][alpha]["test_accuracy"] - complete[s][0.0]["test_accuracy"])
            for s in sorted(complete)
        ]
        fixed[alpha] = {"delta": _mean_std(d)[0], "wins": sum(v > 0 for v in d)}
    base = [b for b, _ in rows]
    rdrop = [r for _, r in rows]
    return {
        "seeds": len(rows),
        "baseline_accuracy": 100.0 * _mean_std([b["test_accuracy"] for b in base])[0],
        "rdrop_accuracy": 100.0 * _mean_std([r["test_accuracy"] for r in rdrop])[0],
        "delta": _mean_std(acc)[0],
        "delta_std": _mean_std(acc)[1],
        "deltas": acc,
        "wins": tests["wins"],
        "losses": tests["losses"],
        "t_p": tests["t_p"],
        "sign_p": tests["sign_p"],
        "nll_delta": _mean_std(delta("test_nll"))[0],
        "ece_delta": 100.0 * _mean_std(delta("test_ece"))[0],
        "chosen_alphas": chosen,
        "baseline_steps": _mean_std([b["steps_to_best"] for b in base])[0],
        "rdrop_steps": _mean_std([r["steps_to_best"] for r in rdrop])[0],
        "baseline_seconds": _mean_std([b["train_seconds_to_best"] for b in base])[0],
        "rdrop_seconds": _mean_std([r["train_seconds_to_best"] for r in rdrop])[0],
        "baseline_cpu_seconds": _mean_std(
            [b["train_cpu_seconds_to_best"] for b in base]
        )[0],
        "rdrop_cpu_seconds": _mean_std([r["train_cpu_seconds_to_best"] for r in rdrop])[
            0
        ],
        "step_time_ratio": _mean_std([per_step(r) / per_step(b) for b, r in rows])[0],
        "capped": sum(r["hit_cap"] for pair in rows for r in pair),
        "arms": 2 * len(rows),
        "fixed_alpha": {f"{a:g}": v for a, v in fixed.items()},
        "title": rdrop[0]["info"]["title"],
        "train_size": rdrop[0]["info"]["sizes"]["train"],
    }


def summarize(runs: dict) -> dict:
    tasks = {t: s for t in sorted(runs) if (s := summarize_task(runs[t]))}
    full = [s for t, s in tasks.items() if not t.endswith("+lora")]
    if full:
        deltas = [d for s in full for d in s["deltas"]]
        tests = text_data.paired_tests(deltas)
        tasks["all"] = {
            "seeds": len(deltas),
            "delta": _mean_std(deltas)[0],
            "delta_std": _mean_std(deltas)[1],
            "wins": tests["wins"],
            "losses": tests["losses"],
            "t_p": tests["t_p"],
            "sign_p": tests["sign_p"],
            "tasks": len(full),
        }
    return tasks


def _p(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.3f}"


def markdown(summary: dict) -> str:
    lines = [
        "# R-Drop with every weight fine-tuned: all-MiniLM-L6-v2 on text tasks",
        "",
        "Paired seeds; each arm trains until validation accuracy stops improving "
        "(patience 2 epochs) and keeps its best epoch; R-Drop's alpha is chosen "
        "per seed on validation. Δ: R-Drop minus the baseline of the same seed, "
        "test accuracy in points (± std over seeds); NLL in nats; ECE in points "
        "(15 bins). Steps and seconds: to the best epoch (means); seconds are the "
        "training process's CPU time, and the step-time ratio is R-Drop's CPU "
        "time per step over the baseline's.",
        "",
        "| task | train texts | seeds | baseline acc | Δ acc | wins | t p | sign p "
        "| Δ NLL | Δ ECE | alphas chosen | steps base / R-Drop | CPU s base / R-Drop "
        "| step time × |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, s in summary.items():
        if task == "all":
            continue
        counts = {}
        for a in s["chosen_alphas"]:
            counts[f"{a:g}"] = counts.get(f"{a:g}", 0) + 1
        chosen = ", ".join(
            f"{a}×{n}" for a, n in sorted(counts.items(), key=lambda x: float(x[0]))
        )
        lines.append(
            f"| {task} | {s['train_size']} | {s['seeds']} "
            f"| {s['baseline_accuracy']:.2f} "
            f"| {s['delta']:+.2f} ± {s['delta_std']:.2f} | {s['wins']}/{s['seeds']} "
            f"| {_p(s['t_p'])} | {_p(s['sign_p'])} | {s['nll_delta']:+.3f} "
            f"| {s['ece_delta']:+.2f} | {chosen} | {s['baseline_steps']:.0f} / "
            f"{s['rdrop_steps']:.0f} | {s['baseline_cpu_seconds']:.0f} / "
            f"{s['rdrop_cpu_seconds']:.0f} | {s['step_time_ratio']:.2f} |"
        )
    if "all" in summary:
        s = summary["all"]
        lines.append(
            f"| all ({s['tasks']} tasks) | | {s['seeds']} | | {s['delta']:+.2f} ± "
            f"{s['delta_std']:.2f} | {s['wins']}/{s['seeds']} | {_p(s['t_p'])} "
            f"| {_p(s['sign_p'])} | | | | | | |"
        )
    lines += ["", "Each fixed alpha, Δ accuracy (points) and wins:", ""]
    for task, s in summary.items():
        if task != "all":
            cells = ", ".join(
                f"alpha {a}: {v['delta']:+.2f} ({v['wins']}/{s['seeds']})"
                for a, v in s["fixed_alpha"].items()
            )
            lines.append(f"- {task}: {cells}")
    return "\n".join(lines) + "\n"


def frozen_deltas() -> dict:
    """The frozen-encoder regime's per-task paired differences (points)."""
    if not FROZEN.exists():
        return {}
    summary = json.loads(FROZEN.read_text()).get("summary", {})
    return {
        task: [100.0 * d for d in s["diff_accuracy"]] for task, s in summary.items()
    }


def figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frozen = frozen_deltas()
    tasks = [t for t in summary if t != "all"]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(tasks) + 1.6))
    for i, task in enumerate(tasks):
        s = summary[task]
        ax.errorbar(
            s["delta"],
            i + 0.12,
            xerr=s["delta_std"],
            fmt="o",
            color="C0",
            label="whole encoder fine-tuned" if i == 0 else None,
        )
        base = task.split("+")[0]
        if base in frozen and "+" not in task:
            m, sd = _mean_std(frozen[base])
            ax.errorbar(
                m,
                i - 0.12,
                xerr=sd,
                fmt="s",
                color="C1",
                label="head on the frozen encoder" if i == 0 else None,
            )
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("R-Drop − baseline, test accuracy (points; mean ± std over seeds)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default=str(RUNS_DIR))
    parser.add_argument("--markdown", default=str(OUT_MD))
    parser.add_argument("--json", default=str(OUT_JSON))
    parser.add_argument("--figure", default=str(FIGURE))
    args = parser.parse_args(argv)
    summary = summarize(load_runs(Path(args.runs_dir)))
    Path(args.markdown).write_text(markdown(summary))
    Path(args.json).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    if summary:
        figure(summary, Path(args.figure))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
