"""Statistics of a run: per-round times to medians, paired ratios, memory deltas.

Also the small formatting helpers the report shares, and the merge of
several runs into one.
"""

from __future__ import annotations

import statistics

from rdrop_bench.config import counterpart_of, peer_of, plain_of


def timed(rounds, key="ms"):
    return [r[key] for r in rounds if not r["warmup"]]


def paired_ratio(a, b):
    """Median over rounds of a[i] / b[i]: both measured in the same round."""
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    return statistics.median(ratios) if ratios else None


def fmt(value, spec=".2f", suffix=""):
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _row(
    backend,
    variant,
    info,
    own,
    plain,
    peer,
    peer_rounds,
    mem,
    plain_mem,
    counterpart=None,
    counterpart_rounds=None,
):
    """`own`, `plain`, `peer_rounds`, `counterpart_rounds`: round messages.

    `counterpart`: the variant this one differs from by one modifier
    (`_jit`, `@LABEL`), or None.
    """
    ms, cpu = timed(own), timed(own, "cpu_ms")

    def ratio(other, key):
        return paired_ratio(timed(own, key), timed(other, key)) if other else None

    def get(m, key):
        return None if m is None else m[key]

    def delta(key):
        if mem is None or plain_mem is None:
            return None
        return mem[key] - plain_mem[key]

    return {
        "backend": backend,
        "variant": variant,
        "jit": info["jit_compile"],
        "params": info["params"],
        "median": statistics.median(ms),
        "min": min(ms),
        "max": max(ms),
        "cpu_median": statistics.median(cpu),
        "faults_median": (
            statistics.median(timed(own, "faults"))
            if all("faults" in r for r in own)
            else None
        ),
        "rounds": len(ms),
        "timed_ms": ms,
        "timed_cpu_ms": cpu,
        "vs_plain": ratio(plain, "ms"),
        "vs_plain_cpu": ratio(plain, "cpu_ms"),
        "peer": peer if peer_rounds else None,
        "vs_peer": ratio(peer_rounds, "ms"),
        "vs_peer_cpu": ratio(peer_rounds, "cpu_ms"),
        "counterpart": counterpart if counterpart_rounds else None,
        "vs_counterpart": ratio(counterpart_rounds, "ms"),
        "vs_counterpart_cpu": ratio(counterpart_rounds, "cpu_ms"),
        "peak_rss_mb": get(mem, "steady_peak_mb"),
        "warmup_peak_mb": get(mem, "warmup_peak_mb"),
        "growth_mb": get(mem, "steady_growth_mb"),
        "retained_mb": get(mem, "retained_mb"),
        "transient_mb": get(mem, "step_transient_mb"),
        "growth_vs_plain_mb": delta("steady_growth_mb"),
        "peak_vs_plain_mb": delta("steady_peak_mb"),
        "transient_vs_plain_mb": delta("step_transient_mb"),
        "xla": None if mem is None else mem.get("xla"),
        "saved_mb": None if mem is None else mem.get("autograd_saved_mb"),
        "variables": None if mem is None else mem.get("variables"),
        "torch_compile": None if mem is None else mem.get("torch_compile"),
    }


def summarize(result: dict) -> dict:
    """Per backend and variant: time stats, paired ratios, memory deltas."""
    loops = {w["variant"]: w for w in result.get("loops", [])}
    activation_mb = weight_mb = None
    for w in loops.values():
        activation_mb = w["info"]["activation_bytes"] / 2**20
        weight_mb = w["info"]["weight_bytes"] / 2**20
    rows = []
    for group in result["groups"]:
        workers = {w["variant"]: w for w in group["workers"]}
        for variant, w in workers.items():
            # plain with the same modifiers (plain_jit for rdrop_concat_jit),
            # else plain.
            plain = workers.get(plain_of(variant)) or workers.get("plain")
            peer = peer_of(variant)
            other = workers.get(counterpart_of(variant))
            rows.append(
                _row(
                    group["backend"],
                    variant,
                    w["info"],
                    w["rounds"],
                    plain["rounds"] if plain else None,
                    peer,
                    group["loop_rounds"].get(peer),
                    w["memory"],
                    plain["memory"] if plain else None,
                    counterpart_of(variant),
                    other["rounds"] if other else None,
                )
            )
    # The PyTorch loop: its rounds from every group, in order; its ratio to
    # the plain loop paired within the groups that ran both.
    groups = result["groups"]
    plain_loop = loops.get("torch_plain")
    for variant, w in loops.items():
        own = [r for g in groups for r in g["loop_rounds"].get(variant, [])]
        row = _row(
            "PyTorch loop",
            variant,
            w["info"],
            own,
            None,
            None,
            None,
            w["memory"],
            plain_loop["memory"] if plain_loop else None,
        )
        both = [
            g["loop_rounds"]
            for g in groups
            if variant in g["loop_rounds"] and "torch_plain" in g["loop_rounds"]
        ]
        if both:
            a = [r for lr in both for r in lr[variant]]
            b = [r for lr in both for r in lr["torch_plain"]]
            row["vs_plain"] = paired_ratio(timed(a), timed(b))
            row["vs_plain_cpu"] = paired_ratio(timed(a, "cpu_ms"), timed(b, "cpu_ms"))
        rows.append(row)
    return {"rows": rows, "activation_mb": activation_mb, "weight_mb": weight_mb}


def exact(row) -> str:
    """XLA scratch + arguments (JAX, TF with XLA) or autograd-saved (PyTorch)."""
    xla, saved = row.get("xla"), row.get("saved_mb")
    if xla and "temp_mb" in xla:
        return f"XLA temp {xla['temp_mb']:.1f}, args {xla['arguments_mb']:.1f}"
    if saved is not None:
        return f"saved {saved:.1f}"
    return "—"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def merge_runs(runs: list[dict]) -> dict:
    """One run from several (e.g. one per backend): groups of a model joined.

    Each group keeps the PyTorch-loop rounds measured beside it, so every
    ratio still comes from one run. The loop rows' memory is the first run's.
    """
    if len(runs) == 1:
        return runs[0]
    meta = dict(runs[0]["meta"])
    meta["merged_from"] = [r["meta"]["date"] for r in runs]
    meta["wall_s"] = sum(r["meta"].get("wall_s", 0) for r in runs)
    meta["backends"] = [b for r in runs for b in r["meta"]["backends"]]
    meta["quick"] = any(r["meta"]["quick"] for r in runs)
    commits = {r["meta"]["git"]["commit"] for r in runs}
    if len(commits) > 1:
        meta["git"] = dict(meta["git"], commit="+".join(sorted(commits)))
    models = {}
    for run in runs:
        for result in run["results"]:
            model = result["model"]
            if model not in models:
                models[model] = dict(result, groups=list(result["groups"]))
                continue
            merged = models[model]
            merged["groups"].extend(result["groups"])
            known = {w["variant"] for w in merged.get("loops", [])}
            merged["loops"] = merged.get("loops", []) + [
                w for w in result.get("loops", []) if w["variant"] not in known
            ]
    return {"meta": meta, "results": list(models.values())}
