"""Build `docs/numbers.md`: one table of every number the docs quote.

Every number in README.md and docs/*.md that comes from a measurement is read
here from the committed result files, never typed by hand:

- `benchmarks/results/*.json` (step-time ratios through the benchmark's own
  `rdrop_bench.stats.summarize`, the function behind `bench.py --report`),
- the tables the example scripts write: `examples/RESULTS.md` (the default
  demo), `examples/RESULTS_FULL.md` (the full protocol; its per-run records
  are `examples/runs/*.json`) and `examples/HUB_RESULTS.md`,
- `experiments/results/frozen_encoder.json`, the records behind
  `experiments/results/frozen_encoder.md` ("When does R-Drop help?"), read with the
  same formatting as that table.

How to quote a number (for contributors):

- Write `<!--n:KEY-->VALUE` in the Markdown, for example
  `R-Drop costs <!--n:bench.mlp.torch.rdrop_concat-->1.50× plain`. The
  comment is invisible once rendered. VALUE is the number exactly as the
  table in `docs/numbers.md` spells it (a trailing `×`, `%` or unit after it
  is prose, not part of the value).
- A new number needs a new entry in `entries()` below, read from a
  committed file. Then run `python tools/numbers_table.py` to rewrite
  `docs/numbers.md`; `tests/test_numbers_table.py` fails while
  `docs/numbers.md` is stale, while a quote differs from the table, and while
  a ratio (a number followed by `×`) in the prose has no marker.
- A result measured before a later change to the code it measures is
  listed in `STALE` with the reason: its rows say "stale" and name the
  commit they come from, until the benchmark is re-run and the file
  replaced.

Usage:

    python tools/numbers_table.py            # rewrite docs/numbers.md
    python tools/numbers_table.py --check    # exit 1 if stale or a quote differs
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "numbers.md"
BENCH = ROOT / "benchmarks" / "results"
EXAMPLES = ROOT / "examples"
TEXT_TASKS = ROOT / "experiments" / "results" / "frozen_encoder.json"

# `<!--n:KEY-->VALUE`: the marker and the number right after it.
QUOTE = re.compile(r"<!--n:([\w.@+-]+)-->([-+−]?\d[\d,]*(?:\.\d+)?(?:/\d+)?)")
# A ratio in prose: a number followed by ×.
RATIO = re.compile(r"(?<![\w.])(\d+\.\d+)×")

# Result files measured before a later change to what they measure.
STALE = {
    "benchmarks/results/lora-anchor-after-torch.json": (
        "measured before the anchor's fused path, which this classifier now takes"
    ),
    "benchmarks/results/torch-compile-mlp-after.json": (
        "measured before the later changes to the fused R-Drop step"
    ),
    "benchmarks/results/torch-compile-mlp-after-keras316.json": (
        "measured before the later changes to the fused R-Drop step"
    ),
    "examples/HUB_RESULTS.md": (
        "run before the example moved onto the shared harness; not re-run"
    ),
}

MODELS = {
    "mlp": "MLP",
    "transformer": "Transformer",
    "bert_tiny": "BERT-tiny",
    "lm50k": "lm50k",
}
VARIANTS = {
    "wrapper": "RDropModel(alpha=0) / plain",
    "rdrop_seq": "R-Drop sequential / plain",
    "rdrop_concat": "R-Drop concat / plain",
    "anchor": "anchor / plain",
    "rdrop_anchor": "R-Drop + anchor / plain",
}


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    what: str
    source: str
    commit: str

    @property
    def status(self) -> str:
        return "stale" if self.source in STALE else "current"


def _summarize():
    """`rdrop_bench.stats.summarize`, imported from benchmarks/."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from rdrop_bench.stats import summarize
    finally:
        sys.path.pop(0)
    return summarize


def bench_rows(name: str):
    """`(commit, {(model, backend, variant): row})` of one benchmark JSON."""
    run = json.loads((BENCH / name).read_text(encoding="utf-8"))
    summarize = _summarize()
    rows = {}
    for result in run["results"]:
        summary = summarize(result)
        for row in summary["rows"]:
            row = dict(row, logits_bytes=result.get("logits_bytes"))
            rows[result["model"], row["backend"], row["variant"]] = row
    return run["meta"]["git"]["commit"], rows


def exact_mb(row) -> float:
    """XLA temp + arguments, or the bytes autograd saves, in MiB."""
    xla = row.get("xla")
    if xla and "temp_mb" in xla:
        return xla["temp_mb"] + xla["arguments_mb"]
    return row["saved_mb"]


def md_cell(path: Path, heading: str, row: str, column: str) -> str:
    """One cell of a Markdown table: the first table after `heading`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("#") and heading in line
    )
    i = next(j for j in range(start, len(lines)) if lines[j].startswith("|"))
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0].startswith(row):
            return cells[header.index(column)]
    raise KeyError(f"{path.name}: no row {row!r} under {heading!r}")


def commit_of(path: Path) -> str:
    """The commit a results file names ("Commit abc1234." or "at commit abc1234")."""
    match = re.search(r"[Cc]ommit `?([0-9a-f]{7})", path.read_text(encoding="utf-8"))
    return match.group(1) if match else "not recorded"


def _mean(cell: str) -> str:
    """`87.70 ± 1.51` -> `87.70`."""
    return cell.split("±")[0].strip()


def bench_entries() -> list[Entry]:
    out = []
    src = "benchmarks/results/fused-all.json"
    commit, rows = bench_rows("fused-all.json")
    for model, label in MODELS.items():
        for backend in ("jax", "tensorflow", "torch"):
            for variant, what in VARIANTS.items():
                row = rows[model, backend, variant]
                out.append(
                    Entry(
                        f"bench.{model}.{backend}.{variant}",
                        f"{row['vs_plain']:.2f}",
                        f"{label}, {backend}: {what}, step time (wall)",
                        src,
                        commit,
                    )
                )
            for variant in ("plain", "rdrop_concat"):
                row = rows[model, backend, variant]
                out.append(
                    Entry(
                        f"bench.{model}.{backend}.{variant}.vs_loop",
                        f"{row['vs_peer']:.2f}",
                        f"{label}, {backend}: {variant} / the PyTorch loop's "
                        f"{row['peer']}, step time (wall)",
                        src,
                        commit,
                    )
                )
        row = rows[model, "PyTorch loop", "torch_rdrop"]
        out.append(
            Entry(
                f"bench.{model}.loop.rdrop",
                f"{row['vs_plain']:.2f}",
                f"{label}, the PyTorch R-Drop loop / the plain PyTorch loop",
                src,
                commit,
            )
        )
    # LoRA has no PyTorch-loop peer: its ratios to plain only.
    for backend in ("jax", "tensorflow", "torch"):
        for variant, what in VARIANTS.items():
            row = rows["lora", backend, variant]
            out.append(
                Entry(
                    f"bench.lora.{backend}.{variant}",
                    f"{row['vs_plain']:.2f}",
                    f"LoRA, {backend}: {what}, step time (wall)",
                    src,
                    commit,
                )
            )
    # XLA's cost analysis of the JAX step: R-Drop's work over plain's.
    for model, label in {**MODELS, "lora": "LoRA"}.items():
        plain = rows[model, "jax", "plain"]["xla"]
        for variant in ("rdrop_seq", "rdrop_concat"):
            xla = rows[model, "jax", variant]["xla"]
            for key, what in (
                ("gflop", "floating-point operations"),
                ("mega_transcendentals", "transcendental operations (exp, log)"),
            ):
                out.append(
                    Entry(
                        f"bench.{model}.jax.{variant}.xla_{key}",
                        f"{xla[key] / plain[key]:.2f}",
                        f"{label}, JAX: {variant} / plain, XLA's count of {what} "
                        "in one training step",
                        src,
                        commit,
                    )
                )
    for backend in ("jax", "tensorflow", "torch"):
        plain = rows["lm50k", backend, "plain"]
        logits_mb = plain["logits_bytes"] / 2**20
        for variant in ("plain", "rdrop_seq"):
            row = rows["lm50k", backend, variant]
            value = exact_mb(row) / logits_mb
            if variant != "plain":
                value -= exact_mb(plain) / logits_mb
            out.append(
                Entry(
                    f"bench.lm50k.{backend}.{variant}.logits",
                    f"{value:.2f}",
                    f"lm50k, {backend}: {variant}, exact step memory in logits "
                    f"({'over plain' if variant != 'plain' else 'plain'})",
                    src,
                    commit,
                )
            )

    src = "benchmarks/results/lm50k-anchor-tensorflow.json"
    commit, rows = bench_rows("lm50k-anchor-tensorflow.json")
    for variant, label in (("anchor@before", "before"), ("anchor", "now")):
        row = rows["lm50k", "tensorflow", variant]
        out.append(
            Entry(
                f"bench.lm50k.tensorflow.{variant.replace('@before', '.before')}.cpu",
                f"{row['vs_plain_cpu']:.2f}",
                f"lm50k, TensorFlow + XLA: anchor / plain, CPU time ({label})",
                src,
                commit,
            )
        )

    src = "benchmarks/results/lora-anchor-after-torch.json"
    commit, rows = bench_rows("lora-anchor-after-torch.json")
    for variant, label in (("anchor@before", "full copy"), ("anchor", "partial")):
        row = rows["lora", "torch", variant]
        tag = variant.replace("@before", ".before")
        out += [
            Entry(
                f"bench.lora.torch.{tag}.extra_mib",
                f"{row['variables']['extra_mb']:.1f}",
                f"LoRA GPT-2 (44.6M weights), torch: the anchor's extra "
                f"variables, MiB ({label})",
                src,
                commit,
            ),
            Entry(
                f"bench.lora.torch.{tag}.cpu",
                f"{row['vs_plain_cpu']:.2f}",
                f"LoRA GPT-2, torch: anchor / plain, CPU time ({label})",
                src,
                commit,
            ),
        ]

    for name, keras in (
        ("torch-compile-mlp-after.json", "3.15"),
        ("torch-compile-mlp-after-keras316.json", "3.16"),
    ):
        commit, rows = bench_rows(name)
        for variant in ("plain", "rdrop_seq", "rdrop_concat"):
            row = rows["mlp", "torch", f"{variant}_jit"]
            out.append(
                Entry(
                    f"bench.compile.keras{keras.replace('.', '')}.{variant}",
                    f"{row['vs_counterpart_cpu']:.2f}",
                    f"MLP, torch, Keras {keras}: {variant} compiled / eager, CPU time",
                    f"benchmarks/results/{name}",
                    commit,
                )
            )
    return out


def example_entries() -> list[Entry]:
    out = []

    def add(key, path, heading, row, column, what, transform=_mean):
        value = transform(md_cell(path, heading, row, column))
        out.append(
            Entry(key, value, what, str(path.relative_to(ROOT)), commit_of(path))
        )

    full = EXAMPLES / "RESULTS_FULL.md"
    trec = "MiniLM fine-tuned on TREC"
    delta = "R-Drop − baseline: accuracy (points)"
    add(
        "trec.full.baseline.acc",
        full,
        trec,
        "baseline",
        "test accuracy (%)",
        "MiniLM on TREC (320 questions, 5 seeds): baseline test accuracy (%)",
    )
    add(
        "trec.full.rdrop.acc",
        full,
        trec,
        "R-Drop",
        "test accuracy (%)",
        "MiniLM on TREC: R-Drop test accuracy (%) at the chosen alpha",
    )
    add(
        "trec.full.rdrop.delta",
        full,
        trec,
        "R-Drop",
        delta,
        "MiniLM on TREC: R-Drop − baseline, test accuracy (points)",
    )
    add(
        "trec.full.rdrop.wins",
        full,
        trec,
        "R-Drop",
        "R-Drop wins",
        "MiniLM on TREC: seeds R-Drop wins (of 5)",
        str.strip,
    )
    base = float(_mean(md_cell(full, trec, "baseline", "train step (ms)")))
    rdrop = float(_mean(md_cell(full, trec, "R-Drop", "train step (ms)")))
    out.append(
        Entry(
            "trec.full.rdrop.step_ratio",
            f"{rdrop / base:.2f}",
            "MiniLM on TREC: R-Drop step / baseline step (one core)",
            str(full.relative_to(ROOT)),
            commit_of(full),
        )
    )

    forget = "Forgetting on text"
    for beta, tag, label in (
        ("0", "plain", "plain fine-tuning"),
        ("1", "beta1", "anchor, beta = 1"),
    ):
        cells = _row_by_beta(full, forget, beta)
        for column, name in (
            ("change on kept task (points)", "kept"),
            ("change on new task (points)", "new"),
            ("KL(model ‖ θ0) on task-A test texts", "drift"),
            ("train step (ms)", "step"),
        ):
            out.append(
                Entry(
                    f"textforget.full.{tag}.{name}",
                    _mean(cells[column]),
                    f"MiniLM, movie reviews then tweets (5 seeds), {label}: {column}",
                    str(full.relative_to(ROOT)),
                    commit_of(full),
                )
            )
    beta1, plain = "textforget.full.beta1.step", "textforget.full.plain.step"
    steps = {e.key: float(e.value) for e in out if e.key.endswith(".step")}
    out.append(
        Entry(
            "textforget.full.beta1.step_ratio",
            f"{steps[beta1] / steps[plain]:.2f}",
            "MiniLM forgetting: anchor (beta = 1) step / plain step (one core)",
            str(full.relative_to(ROOT)),
            commit_of(full),
        )
    )

    default = EXAMPLES / "RESULTS.md"
    add(
        "mnist.default.rdrop.delta",
        default,
        "R-Drop vs baseline on MNIST",
        "R-Drop",
        delta,
        "MNIST, default demo (3 seeds): R-Drop − baseline, test accuracy (points)",
    )
    add(
        "trec.default.rdrop.delta",
        default,
        "MiniLM fine-tuned on TREC",
        "R-Drop",
        delta,
        "MiniLM on TREC, default demo (160 questions): R-Drop − baseline (points)",
    )
    mnist_forget = "Forgetting: fine-tuning on a shifted domain"
    add(
        "mnistforget.default.plain.kept",
        default,
        mnist_forget,
        "plain",
        "change on kept task (points)",
        "MNIST forgetting, default demo: plain, change on the original task (points)",
    )
    cells = _row_by_beta(default, mnist_forget, "0.3")
    for column, name in (
        ("change on kept task (points)", "kept"),
        ("change on new task (points)", "new"),
    ):
        out.append(
            Entry(
                f"mnistforget.default.beta0.3.{name}",
                _mean(cells[column]),
                f"MNIST forgetting, default demo: anchor beta = 0.3, {column}",
                str(default.relative_to(ROOT)),
                commit_of(default),
            )
        )
    add(
        "mnistforget.default.plain.new",
        default,
        mnist_forget,
        "plain",
        "change on new task (points)",
        "MNIST forgetting, default demo: plain, change on the new domain (points)",
    )

    hub = EXAMPLES / "HUB_RESULTS.md"
    for row, tag in (
        ("pretrained", "pretrained"),
        ("fine-tuned, plain", "plain"),
        ("fine-tuned, anchor β=0.3", "beta0.3"),
    ):
        for column, name in (
            ("new (SMS) test ppl", "new"),
            ("old (TREC) test ppl", "old"),
        ):
            value = _mean(md_cell(hub, "Causal LM fine-tuning", row, column))
            out.append(
                Entry(
                    f"hub.{tag}.{name}_ppl",
                    value,
                    f"keras-hub GPT-2 causal LM: {row}, {column}",
                    str(hub.relative_to(ROOT)),
                    commit_of(hub),
                )
            )
    return out


def _pts(values, signed: bool = True) -> str:
    """Mean of fractions in points, as `experiments/frozen_encoder.py` prints it."""
    return f"{100 * statistics.fmean(values):{'+' if signed else ''}.2f}"


def _p(value) -> str:
    """A p-value as `experiments/frozen_encoder.py` prints it."""
    return f"{value:.3f}" if value < 0.01 else f"{value:.2f}"


def text_task_entries() -> list[Entry]:
    """ "When does R-Drop help?": 4 text tasks, R-Drop at the validation-chosen
    alpha minus the baseline, from the records of `experiments/frozen_encoder.py`."""
    run = json.loads(TEXT_TASKS.read_text(encoding="utf-8"))
    src = str(TEXT_TASKS.relative_to(ROOT))
    commit = ",".join(sorted({r["commit"] for r in run["runs"]}))
    summary = {task: s for task, s in run["summary"].items() if s}
    out = []

    def add(key, value, what):
        out.append(Entry(f"tasks.{key}", value, what, src, commit))

    for task, s in summary.items():
        title = run["data"][task]["title"]
        seeds = len(s["seeds"])
        head = f"{title} (frozen MiniLM + head, {seeds} seeds)"
        add(
            f"{task}.baseline.acc",
            _pts(s["base_accuracy"], signed=False),
            f"{head}: baseline test accuracy (%)",
        )
        add(
            f"{task}.rdrop.delta",
            _pts(s["diff_accuracy"]),
            f"{head}: R-Drop at the validation-chosen alpha − baseline, "
            "test accuracy (points), mean over seeds",
        )
        add(
            f"{task}.rdrop.delta_std",
            f"{100 * statistics.stdev(s['diff_accuracy']):.2f}",
            f"{head}: std over seeds of that paired difference (points)",
        )
        add(
            f"{task}.rdrop.wins",
            f"{s['tests']['wins']}/{seeds}",
            f"{head}: seeds where R-Drop's test accuracy was higher",
        )
        add(
            f"{task}.rdrop.t_p",
            _p(s["tests"]["t_p"]),
            f"{head}: paired t-test p (two-sided) of the accuracy difference",
        )
        add(
            f"{task}.rdrop.ece_delta",
            _pts(s["diff_ece"]),
            f"{head}: R-Drop − baseline, test ECE (points, 15 bins)",
        )
        add(
            f"{task}.step_ratio",
            f"{s['step_time_ratio']:.2f}",
            f"{head}: R-Drop step / baseline step (median seconds per step)",
        )

    tasks = list(summary)
    means = [statistics.fmean(summary[t]["diff_accuracy"]) for t in tasks]
    label = f"All {len(tasks)} text tasks"

    def across(key: str) -> float:
        """The mean over tasks of the mean over seeds of `key`."""
        return statistics.fmean(statistics.fmean(summary[t][key]) for t in tasks)

    add(
        "all.delta",
        f"{100 * statistics.fmean(means):+.2f}",
        f"{label}: mean over tasks of the mean R-Drop − baseline test accuracy "
        "(points)",
    )
    add(
        "all.ahead",
        f"{sum(m > 0 for m in means)}/{len(tasks)}",
        f"{label}: tasks where R-Drop's mean test accuracy was higher",
    )
    add(
        "all.ece_delta",
        f"{100 * across('diff_ece'):+.2f}",
        f"{label}: mean over tasks of the R-Drop − baseline test ECE (points)",
    )
    p_values = [summary[t]["tests"]["t_p"] for t in tasks]
    add("all.t_p.min", _p(min(p_values)), f"{label}: smallest paired-t p")
    add("all.t_p.max", _p(max(p_values)), f"{label}: largest paired-t p")
    ratios = [summary[t]["step_time_ratio"] for t in tasks]
    add(
        "all.step_ratio.min",
        f"{min(ratios):.2f}",
        f"{label}: smallest R-Drop / baseline step time",
    )
    add(
        "all.step_ratio.max",
        f"{max(ratios):.2f}",
        f"{label}: largest R-Drop / baseline step time",
    )
    for arm, key, name in (
        ("base", "baseline", "baseline"),
        ("rdrop", "rdrop", "R-Drop"),
    ):
        add(
            f"all.steps.{key}",
            f"{across(f'{arm}_steps'):.0f}",
            f"{label}: {name}'s steps to its best validation epoch, mean over "
            "tasks of the mean over seeds",
        )
    chosen = [a for t in tasks for a in summary[t]["chosen_alpha"]]
    for alpha in run["alphas"][1:]:
        add(
            f"all.chosen.alpha{alpha:g}",
            f"{chosen.count(alpha)}/{len(chosen)}",
            f"{label}: seeds whose validation choice was alpha = {alpha:g}",
        )
    for alpha in run["alphas"][1:]:
        fixed = [
            next(c for a, c in summary[t]["fixed"].items() if float(a) == alpha)
            for t in tasks
        ]
        fixed_means = [statistics.fmean(c["diff_accuracy"]) for c in fixed]
        add(
            f"all.fixed.alpha{alpha:g}.delta",
            f"{100 * statistics.fmean(fixed_means):+.2f}",
            f"{label}: R-Drop at the fixed alpha {alpha:g} − baseline, mean over "
            "tasks of the mean test accuracy difference (points)",
        )
        add(
            f"all.fixed.alpha{alpha:g}.ahead",
            f"{sum(m > 0 for m in fixed_means)}/{len(tasks)}",
            f"{label}: tasks where R-Drop at the fixed alpha {alpha:g} had the "
            "higher mean test accuracy",
        )
        add(
            f"all.fixed.alpha{alpha:g}.t_p.min",
            _p(min(c["tests"]["t_p"] for c in fixed)),
            f"{label}: smallest paired-t p over tasks at the fixed alpha {alpha:g}",
        )
    cells = [(t, a, summary[t]["fixed"][a]) for t in tasks for a in summary[t]["fixed"]]
    hits = [(t, a, c) for t, a, c in cells if c["tests"]["t_p"] < 0.05]
    add(
        "all.fixed.p_below_0.05",
        f"{len(hits)}/{len(cells)}",
        f"{label}: fixed-alpha cells (task × alpha) whose paired-t p < 0.05",
    )
    for t, a, c in hits:
        title = run["data"][t]["title"]
        add(
            f"{t}.fixed.alpha{float(a):g}.delta",
            _pts(c["diff_accuracy"]),
            f"{title}: R-Drop at the fixed alpha {float(a):g} − baseline, test "
            "accuracy (points)",
        )
        add(
            f"{t}.fixed.alpha{float(a):g}.t_p",
            _p(c["tests"]["t_p"]),
            f"{title}: paired-t p of that difference",
        )
    return out


def _row_by_beta(path: Path, heading: str, beta: str) -> dict:
    """The row of an anchor table whose `beta` column is `beta`, by column."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("#") and heading in line
    )
    i = next(j for j in range(start, len(lines)) if lines[j].startswith("|"))
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[header.index("beta")] == beta:
            return dict(zip(header, cells))
    raise KeyError(f"{path.name}: no beta {beta} under {heading!r}")


RECIPE_VARIANTS = {
    "rdrop_seq": "R-Drop sequential, prefix shared / plain",
    "rdrop_seq_unshared": "R-Drop sequential, whole model twice / plain",
    "rdrop_concat": "R-Drop concat, prefix shared / plain",
    "rdrop_concat_unshared": "R-Drop concat, whole model twice / plain",
    "anchor": "anchor, prefix reused / plain",
    "anchor_unshared": "anchor, whole reference pass / plain",
    "rdrop_anchor": "R-Drop concat + anchor, prefix shared / plain",
}


def recipe_entries() -> list[Entry]:
    """The frozen-base recipe (results/frozen-base): prefix sharing."""
    src = "benchmarks/results/frozen-base.json"
    if not (ROOT / src).exists():
        return []
    commit, rows = bench_rows("frozen-base.json")
    out = []
    for backend in ("jax", "tensorflow", "torch"):
        for variant, what in RECIPE_VARIANTS.items():
            row = rows.get(("frozen_base", backend, variant))
            if row is None:
                continue
            for key, suffix, how in (
                ("vs_plain", "", "step time (wall)"),
                ("vs_plain_cpu", ".cpu", "CPU time"),
            ):
                out.append(
                    Entry(
                        f"bench.frozen_base.{backend}.{variant}{suffix}",
                        f"{row[key]:.2f}",
                        f"frozen base + head, {backend}: {what}, {how}",
                        src,
                        commit,
                    )
                )
        for variant in ("plain", "rdrop_seq", "rdrop_concat"):
            row = rows[("frozen_base", backend, variant)]
            out.append(
                Entry(
                    f"bench.frozen_base.{backend}.{variant}.vs_loop",
                    f"{row['vs_peer']:.2f}",
                    f"frozen base + head, {backend}: {variant} / the PyTorch "
                    f"loop's {row['peer']} step (wall)",
                    src,
                    commit,
                )
            )
    row = rows[("frozen_base", "PyTorch loop", "torch_rdrop")]
    out.append(
        Entry(
            "bench.frozen_base.loop.rdrop",
            f"{row['vs_plain']:.2f}",
            "frozen base + head, the PyTorch R-Drop loop / the plain PyTorch loop",
            src,
            commit,
        )
    )
    return out


def rerun_entries() -> list[Entry]:
    """The reruns of the main table's rows above 2x plain (results/rerun-*),
    and lm50k on TensorFlow + XLA before and after the whole-tensor R-Drop
    pass (results/lm50k-rdrop-tensorflow)."""
    out = []

    def ratio(xla, plain, key):
        return f"{xla[key] / plain[key]:.2f}"

    src = "benchmarks/results/lm50k-rdrop-tensorflow.json"
    commit, rows = bench_rows("lm50k-rdrop-tensorflow.json")
    plain = rows["lm50k", "tensorflow", "plain"]
    for variant in ("rdrop_seq", "rdrop_concat"):
        for tag, label in (("@before", "chunked"), ("", "whole tensors")):
            row = rows["lm50k", "tensorflow", variant + tag]
            key = f"bench.lm50k_tf.{variant}{tag.replace('@', '.')}"
            out += [
                Entry(
                    key,
                    f"{row['vs_plain']:.2f}",
                    f"lm50k, TensorFlow + XLA: {variant} / plain, wall ({label})",
                    src,
                    commit,
                ),
                Entry(
                    f"{key}.xla_gflop",
                    ratio(row["xla"], plain["xla"], "gflop"),
                    f"lm50k, TensorFlow + XLA: {variant} / plain, XLA's count of "
                    f"floating-point operations ({label})",
                    src,
                    commit,
                ),
                Entry(
                    f"{key}.xla_bytes",
                    ratio(row["xla"], plain["xla"], "bytes_accessed_mb"),
                    f"lm50k, TensorFlow + XLA: {variant} / plain, XLA's bytes "
                    f"accessed ({label})",
                    src,
                    commit,
                ),
                Entry(
                    f"{key}.xla_transcendentals",
                    ratio(row["xla"], plain["xla"], "mega_transcendentals"),
                    f"lm50k, TensorFlow + XLA: {variant} / plain, XLA's count of "
                    f"transcendental operations ({label})",
                    src,
                    commit,
                ),
                Entry(
                    f"{key}.temp_mib",
                    f"{row['xla']['temp_mb']:.0f}",
                    f"lm50k, TensorFlow + XLA: {variant}, XLA temp MiB ({label})",
                    src,
                    commit,
                ),
            ]
    src = "benchmarks/results/fused-tensorflow.json"
    commit, rows = bench_rows("fused-tensorflow.json")
    for model, label in {**MODELS, "lora": "LoRA"}.items():
        plain = rows[model, "tensorflow", "plain"]
        for variant in ("rdrop_seq", "rdrop_concat"):
            row = rows[model, "tensorflow", variant]
            out += [
                Entry(
                    f"bench.tf_now.{model}.{variant}",
                    f"{row['vs_plain']:.2f}",
                    f"{label}, TensorFlow + XLA (rerun): {variant} / plain, wall",
                    src,
                    commit,
                ),
                Entry(
                    f"bench.tf_now.{model}.{variant}.xla_gflop",
                    ratio(row["xla"], plain["xla"], "gflop"),
                    f"{label}, TensorFlow + XLA (rerun): {variant} / plain, XLA's "
                    "count of floating-point operations",
                    src,
                    commit,
                ),
            ]

    src = "benchmarks/results/frozen-base-torch.json"
    commit, rows = bench_rows("frozen-base-torch.json")
    for variant in ("plain", "rdrop_seq", "rdrop_concat", "anchor"):
        row = rows["frozen_base", "torch", variant]
        if variant != "plain":
            out.append(
                Entry(
                    f"bench.frozen_base_torch.{variant}",
                    f"{row['vs_plain']:.2f}",
                    f"frozen base + head, torch (rerun): {variant} / plain, wall",
                    src,
                    commit,
                )
            )
        if variant != "anchor":
            out.append(
                Entry(
                    f"bench.frozen_base_torch.{variant}.vs_loop",
                    f"{row['vs_peer']:.2f}",
                    f"frozen base + head, torch (rerun): {variant} / the PyTorch "
                    f"loop's {row['peer']} step (wall)",
                    src,
                    commit,
                )
            )
    loop_rdrop = rows["frozen_base", "PyTorch loop", "torch_rdrop"]["vs_plain"]
    keras_plain = rows["frozen_base", "torch", "plain"]["vs_peer"]
    out.append(
        Entry(
            "bench.frozen_base_torch.rdrop_needed_for_goal",
            f"{0.67 * loop_rdrop / keras_plain:.2f}",
            "frozen base + head, torch (rerun): the R-Drop step / plain Keras "
            "step at which R-Drop takes 0.67x the loop's R-Drop step (0.67 x "
            "loop R-Drop / loop plain, over Keras plain / loop plain)",
            src,
            commit,
        )
    )
    for name, model, backends in (
        ("rerun-bert_tiny.json", "bert_tiny", ("tensorflow",)),
        ("rerun-lora.json", "lora", ("tensorflow", "torch")),
    ):
        src = f"benchmarks/results/{name}"
        commit, rows = bench_rows(name)
        for backend in backends:
            plain = rows[model, backend, "plain"]
            for variant in ("plain", "rdrop_seq", "rdrop_concat"):
                row = rows[model, backend, variant]
                key = f"bench.rerun.{model}.{backend}.{variant}"
                out.append(
                    Entry(
                        f"{key}.faults",
                        f"{row['faults_median']:.0f}",
                        f"rerun, {model}, {backend}: {variant}, page faults per step",
                        src,
                        commit,
                    )
                )
                if variant == "plain":
                    continue
                out.append(
                    Entry(
                        key,
                        f"{row['vs_plain']:.2f}",
                        f"rerun, {model}, {backend}: {variant} / plain, wall",
                        src,
                        commit,
                    )
                )
                if (row.get("xla") or {}).get("gflop"):
                    out.append(
                        Entry(
                            f"{key}.xla_gflop",
                            ratio(row["xla"], plain["xla"], "gflop"),
                            f"rerun, {model}, {backend}: {variant} / plain, "
                            "XLA's count of floating-point operations",
                            src,
                            commit,
                        )
                    )
    return out


def entries() -> list[Entry]:
    return (
        bench_entries()
        + recipe_entries()
        + rerun_entries()
        + example_entries()
        + text_task_entries()
    )


def render(rows: list[Entry]) -> str:
    lines = [
        "# Numbers",
        "",
        "Every number the README and these pages quote, read from the committed",
        "result files by `tools/numbers_table.py` (do not edit by hand: run",
        "`python tools/numbers_table.py`). Rows marked *stale* come from a",
        "result measured before a later change to what it measures; they wait",
        "for a re-run.",
        "",
        "| key | value | what | source | commit | status |",
        "|---|---:|---|---|---|---|",
    ]
    for e in rows:
        lines.append(
            f"| `{e.key}` | {e.value} | {e.what} | `{e.source}` | `{e.commit}` "
            f"| {e.status} |"
        )
    lines += [
        "",
        "Generated from the files named in the source column; each file's own",
        "header gives the machine, versions and settings of its run.",
        "",
        "Stale sources, to re-run:",
        "",
    ]
    used = {e.source for e in rows}
    lines += [f"- `{src}`: {why}." for src, why in STALE.items() if src in used]
    lines.append("")
    return "\n".join(lines)


def doc_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def prose(text: str) -> str:
    """`text` without fenced code blocks (a block's numbers are code)."""
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def check_quotes(rows: list[Entry], files=None) -> list[str]:
    """Problems: unknown keys, values that differ, ratios without a marker."""
    table = {e.key: e.value for e in rows}
    problems = []
    for path in files or doc_files():
        if path == OUT:
            continue
        name = path.relative_to(ROOT)
        text = prose(path.read_text(encoding="utf-8"))
        for key, value in QUOTE.findall(text):
            if key not in table:
                problems.append(f"{name}: no number {key!r} in the table")
            elif value.replace("−", "-") != table[key]:
                problems.append(
                    f"{name}: {key} quoted as {value}, the table says {table[key]}"
                )
        unmarked = QUOTE.sub("", text)
        for match in RATIO.finditer(unmarked):
            problems.append(
                f"{name}: ratio {match.group(0)} without a <!--n:KEY--> marker"
            )
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="check, do not write")
    args = parser.parse_args(argv)
    rows = entries()
    text = render(rows)
    problems = check_quotes(rows)
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            problems.insert(
                0, f"{OUT.relative_to(ROOT)} is stale: run tools/numbers_table.py"
            )
    else:
        OUT.write_text(text, encoding="utf-8")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
