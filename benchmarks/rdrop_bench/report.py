"""The markdown report of a run: time and memory tables, budgets, targets."""

from __future__ import annotations

from rdrop_bench.stats import exact, fmt, paired_ratio, summarize, table


def markdown(run: dict) -> str:
    meta = run["meta"]
    git = meta["git"]
    lines = [
        f"Run {meta['date']} on {meta['machine']['cpu']} "
        f"({meta['machine']['cores']} cores), {meta['threads']} thread(s) per "
        f"worker, jit={meta['jit']}, keras-rdrop at {git['commit']}"
        + (" (keras_rdrop/ modified)" if git["keras_rdrop_dirty"] else "")
        + (f" ({git['source']})" if git.get("source") else "")
        + (", **quick mode**" if meta["quick"] else "")
        + (
            ", every Keras variant synced each step (--sync-every-step)"
            if meta.get("sync_every_step")
            else ""
        )
        + (", **profiled: timings distorted**" if meta.get("profile") else "")
        + f", {meta.get('wall_s', 0):.0f} s in all."
    ]
    for label, state in git.get("sources", {}).items():
        lines[0] += (
            f" Variants @{label}: keras-rdrop at {state['commit'] or 'unknown commit'}"
            + (" (keras_rdrop/ modified)" if state["keras_rdrop_dirty"] else "")
            + f" ({state['source']})."
        )
    for result in run["results"]:
        summary = summarize(result)
        rows = summary["rows"]
        params = {r["backend"] == "PyTorch loop": r["params"] for r in rows}
        lines += [
            "",
            f"#### {result['model']}",
            "",
            f"{result['rounds']} timed rounds of {result['steps_per_round']} steps "
            f"(the first {result['skipped_steps_per_round']} of each round "
            f"untimed), after {result['warmup_rounds']} warm-up round(s). "
            f"Parameters: Keras {fmt(params.get(False), ',')}, PyTorch "
            f"{fmt(params.get(True), ',')}. Ratios are medians of per-round "
            "ratios.",
            "",
        ]
        pairs = any(r.get("counterpart") for r in rows)
        lines += table(
            [
                "backend",
                "variant",
                "wall ms/step median",
                "min",
                "max",
                "CPU ms/step median",
                "page faults/step",
                "× plain wall / CPU",
                "× PyTorch loop wall / CPU",
                *(["× counterpart wall / CPU"] if pairs else []),
            ],
            [
                [
                    r["backend"],
                    r["variant"],
                    f"{r['median']:.2f}",
                    f"{r['min']:.2f}",
                    f"{r['max']:.2f}",
                    f"{r['cpu_median']:.2f}",
                    fmt(r["faults_median"], ".0f"),
                    f"{fmt(r['vs_plain'])} / {fmt(r['vs_plain_cpu'])}",
                    f"{fmt(r['vs_peer'])} / {fmt(r['vs_peer_cpu'])} ({r['peer']})"
                    if r["peer"]
                    else "—",
                    *([_counterpart_cell(r)] if pairs else []),
                ]
                for r in rows
            ],
        )
        measured = [r for r in rows if r["growth_mb"] is not None]
        lines += ["", "Memory (resident set, MB):", ""]
        if not measured:
            lines += ["Not measured: variants shared a process (--quick)."]
        lines += (
            []
            if not measured
            else table(
                [
                    "backend",
                    "variant",
                    "peak RSS",
                    "training growth",
                    "Δ growth vs plain",
                    "retained after warm-up",
                    "step transient",
                    "Δ transient vs plain",
                    "exact step memory",
                    "Δ peak RSS vs plain",
                    "variables: extra over inner / trainable / optimizer",
                ],
                [
                    [
                        r["backend"],
                        r["variant"],
                        fmt(r["peak_rss_mb"], ".0f"),
                        fmt(r["growth_mb"], ".1f"),
                        fmt(r["growth_vs_plain_mb"], "+.1f"),
                        fmt(r["retained_mb"], ".1f"),
                        fmt(r["transient_mb"], ".1f"),
                        fmt(r["transient_vs_plain_mb"], "+.1f"),
                        exact(r),
                        fmt(r.get("peak_vs_plain_mb"), "+.1f"),
                        _variables_cell(r),
                    ]
                    for r in measured
                ],
            )
        )
        lines += [
            "",
            "One set of activations (tensors autograd saves in one PyTorch "
            f"training forward pass): {fmt(summary['activation_mb'], '.1f')} MB; "
            f"one copy of the weights: {fmt(summary['weight_mb'], '.1f')} MB.",
            "",
        ]
        compiled = [r for r in rows if r.get("torch_compile")]
        if compiled:
            lines += [
                "torch.compile (variants with jit_compile=True on torch): "
                + "; ".join(
                    f"{r['variant']}: {_dynamo_cell(r['torch_compile'])}"
                    for r in compiled
                )
                + ".",
                "",
            ]
        if result.get("logits_bytes") and measured:
            lines += copies_table(result, measured) + [""]
        lines += targets(summary)
        lines += xla_cost_table(rows)
        if any(r["variant"].endswith("_unshared") for r in rows):
            lines += [""] + prefix_targets(summary)
    return "\n".join(lines) + "\n"


def _counterpart_cell(row) -> str:
    """`× X wall / CPU` against the variant one modifier away, or —."""
    if not row.get("counterpart"):
        return "—"
    return (
        f"{fmt(row['vs_counterpart'])} / {fmt(row['vs_counterpart_cpu'])} "
        f"({row['counterpart']})"
    )


def _variables_cell(row) -> str:
    """Exact MB of variables: what the wrapper adds (the anchor's snapshot)."""
    v = row.get("variables")
    if not v:
        return "—"
    return f"{v['extra_mb']:+.1f} / {v['trainable_mb']:.1f} / {v['optimizer_mb']:.1f}"


def _dynamo_cell(summary: dict) -> str:
    if "error" in summary:
        return summary["error"]
    return (
        f"{summary['graph_breaks']} graph breaks "
        f"({summary['unique_graph_breaks']} distinct), "
        f"{summary['unique_graphs']} graphs"
    )


def _exact_mb(row):
    """A row's exact step memory: XLA args + scratch, or autograd-saved."""
    xla = row.get("xla")
    if xla and "temp_mb" in xla:
        return xla["temp_mb"] + xla["arguments_mb"], "XLA"
    if row.get("saved_mb") is not None:
        return row["saved_mb"], "saved"
    return None, None


def copies_table(result: dict, rows: list[dict]) -> list[str]:
    """Step memory counted in full-size logits tensors (sequence outputs).

    The exact step memory (XLA scratch + arguments on JAX and on TensorFlow
    with XLA, autograd-saved tensors on torch and in the PyTorch loop) and the
    resident-set training growth (every backend; TensorFlow's allocator keeps
    the step's buffers, so its step transient is near 0), each divided by the
    size of one float32 logits tensor of the batch.
    """
    logits_mb = result["logits_bytes"] / 2**20
    by = {(r["backend"], r["variant"]): r for r in rows}
    plain_of = {"PyTorch loop": "torch_plain"}

    def per_logits(value):
        return None if value is None else value / logits_mb

    body = []
    for r in rows:
        plain = by.get((r["backend"], plain_of.get(r["backend"], "plain")))
        value, kind = _exact_mb(r)
        base = _exact_mb(plain)[0] if plain else None
        delta = None if value is None or base is None else value - base
        growth = r["growth_mb"]
        plain_growth = plain["growth_mb"] if plain else None
        d_growth = (
            None if growth is None or plain_growth is None else growth - plain_growth
        )
        xla = r.get("xla") or {}
        label = {"XLA": "XLA temp + args", "saved": "autograd saved"}.get(kind, "—")
        if kind == "XLA":
            label += f" ({xla['temp_mb']:.1f} + {xla['arguments_mb']:.1f})"
        body.append(
            [
                r["backend"],
                r["variant"],
                label,
                fmt(value, ".1f"),
                fmt(per_logits(value), ".2f"),
                fmt(delta, "+.1f"),
                fmt(per_logits(delta), "+.2f"),
                fmt(growth, ".1f"),
                fmt(per_logits(growth), ".2f"),
                fmt(per_logits(d_growth), "+.2f"),
            ]
        )
    shape = " × ".join(f"{n:,}" for n in result["logits_shape"])
    return [
        f"Full-size copies: one logits tensor ({shape}, float32) is "
        f"{result['logits_bytes']:,} bytes = {logits_mb:.1f} MB (MB = 2^20 "
        "bytes throughout). Memory below in MB and in units of that tensor "
        "(÷ logits); Δ against plain of the same backend (torch_plain for the "
        "loop). Budget for R-Drop: Δ ≤ one more set of what a plain step "
        "keeps, i.e. Δ ÷ logits ≤ plain's ÷ logits.",
        "",
        *table(
            [
                "backend",
                "variant",
                "exact step memory",
                "MB",
                "÷ logits",
                "Δ vs plain MB",
                "Δ ÷ logits",
                "RSS training growth MB",
                "÷ logits",
                "Δ ÷ logits",
            ],
            body,
        ),
    ]


def memory_cell(by, backend, variant, weights, activations) -> str:
    """Δ memory of `variant` over plain against the budget, as text.

    Budget: one more set of what a plain step keeps: the plain step's XLA
    scratch (JAX; TensorFlow with XLA) or its autograd-saved tensors (torch
    backend, PyTorch loop); with RSS only (TensorFlow without XLA), the
    activations the PyTorch loop saves. Plus
    one copy of the weights for the anchor. Compared at the 0.1 MB shown.
    """
    row, plain = by.get((backend, variant)), by.get((backend, "plain"))
    if row is None or plain is None or row["growth_mb"] is None:
        return "—"
    value, kind = _exact_mb(row)
    base, _ = _exact_mb(plain)
    if value is not None and base is not None:
        delta = value - base
        budget = plain["xla"]["temp_mb"] if kind == "XLA" else base
    else:
        kind = "RSS"
        delta = row["growth_vs_plain_mb"]
        budget = plain["transient_mb"] if activations is None else activations
    if variant == "anchor":
        # One copy of the weights: the PyTorch loop's, or, without a loop,
        # the inner Keras model's variables.
        if weights is None and plain.get("variables"):
            weights = plain["variables"]["inner_variables_mb"]
        budget += weights or 0.0
    mark = "met" if round(delta, 1) <= round(budget, 1) else "MISSED"
    return f"{delta:+.1f} ≤ {budget:.1f} ({kind}) {mark}"


def ratio_cells(by, backends, variant, key, limit=None, spec=".2f") -> list[str]:
    """One cell per backend: the row's ratio `key` (and its CPU-time one),
    marked "met", "MISSED" or "borderline" against `limit` if given."""
    out = []
    for b in backends:
        r = by.get((b, variant))
        value = None if r is None else r.get(key)
        text = fmt(value, spec)
        cpu = None if r is None else r.get(key + "_cpu")
        if cpu is not None:
            text += f" (CPU {cpu:{spec}})"
        if value is not None and limit is not None:
            hits = [v <= limit for v in (value, cpu) if v is not None]
            text += (
                " met" if all(hits) else " MISSED" if not any(hits) else " borderline"
            )
        out.append(text)
    return out


def targets(summary: dict) -> list[str]:
    rows = summary["rows"]
    weights, activations = summary["weight_mb"], summary["activation_mb"]
    by = {(r["backend"], r["variant"]): r for r in rows}
    backends = [
        b for b in dict.fromkeys(r["backend"] for r in rows) if b != "PyTorch loop"
    ]

    def cells(variant, key, limit=None, spec=".2f"):
        return ratio_cells(by, backends, variant, key, limit, spec)

    faster = []
    for b in backends:
        seq, concat = by.get((b, "rdrop_seq")), by.get((b, "rdrop_concat"))
        if seq is None or concat is None:
            faster.append("—")
            continue
        # Paired per round, like every other ratio here.
        wall = paired_ratio(concat["timed_ms"], seq["timed_ms"])
        cpu = paired_ratio(concat["timed_cpu_ms"], seq["timed_cpu_ms"])
        if wall < 1 and cpu < 1:
            name = "concat"
        elif wall > 1 and cpu > 1:
            name = "sequential"
        else:
            name = "tie"
        faster.append(f"{name} (concat/seq {wall:.2f}, CPU {cpu:.2f})")
    body = [
        ["R-Drop sequential × plain ≤ 2.0", *cells("rdrop_seq", "vs_plain", 2.0)],
        ["R-Drop concat × plain ≤ 2.0", *cells("rdrop_concat", "vs_plain", 2.0)],
        ["anchor × plain ≤ 1.35", *cells("anchor", "vs_plain", 1.35)],
        ["R-Drop + anchor × plain", *cells("rdrop_anchor", "vs_plain")],
        ["R-Drop sequential × PyTorch loop", *cells("rdrop_seq", "vs_peer")],
        ["R-Drop concat × PyTorch loop", *cells("rdrop_concat", "vs_peer")],
        [
            "faster R-Drop mode",
            *faster,
        ],
    ]
    if any(r["growth_mb"] is not None for r in rows):
        for variant, label in (
            ("rdrop_seq", "R-Drop sequential"),
            ("rdrop_concat", "R-Drop concat"),
            ("anchor", "anchor"),
        ):
            body.append(
                [
                    f"{label} memory Δ ≤ budget (MB)",
                    *[
                        memory_cell(by, b, variant, weights, activations)
                        for b in backends
                    ],
                ]
            )
    return table(["target", *backends], body)


def prefix_targets(summary: dict) -> list[str]:
    """The shared prefix against the whole model run in every pass
    (`share_prefix=False`, the `_unshared` variants), and the recipe's goals
    (issue 25): R-Drop ≤ 1.3× plain, the anchor ≤ 1.15× plain, R-Drop at
    least 1.5× faster than the PyTorch loop's (× loop ≤ 1 / 1.5)."""
    rows = summary["rows"]
    by = {(r["backend"], r["variant"]): r for r in rows}
    backends = [
        b for b in dict.fromkeys(r["backend"] for r in rows) if b != "PyTorch loop"
    ]

    def cell(variant, key, limit=None):
        return ratio_cells(by, backends, variant, key, limit)

    body = []
    for variant, label, limit in (
        ("rdrop_seq", "R-Drop sequential", 1.3),
        ("rdrop_concat", "R-Drop concat", 1.3),
        ("anchor", "anchor", 1.15),
        ("rdrop_anchor", "R-Drop + anchor", None),
    ):
        if not any((b, variant) in by for b in backends):
            continue
        goal = f" ≤ {limit}" if limit is not None else ""
        body.append(
            [f"{label}, shared × plain{goal}", *cell(variant, "vs_plain", limit)]
        )
        body.append(
            [f"{label}, unshared × plain", *cell(variant + "_unshared", "vs_plain")]
        )
        if variant.startswith("rdrop") and variant != "rdrop_anchor":
            body.append(
                [
                    f"{label}, shared × PyTorch loop ≤ 0.67",
                    *cell(variant, "vs_peer", 1 / 1.5),
                ]
            )
    return table(["prefix sharing", *backends], body)


def xla_cost_table(rows: list[dict]) -> list[str]:
    """XLA's cost analysis of each variant's step, against plain's, on JAX
    and on TensorFlow (costed from its XLA dump): what a step computes,
    whatever the machine does with it."""
    lines = []
    for backend, name in (("jax", "JAX"), ("tensorflow", "TensorFlow (XLA)")):
        costed = [
            r
            for r in rows
            if r["backend"] == backend and (r.get("xla") or {}).get("gflop") is not None
        ]
        plain = next((r["xla"] for r in costed if r["variant"] == "plain"), None)
        if not costed or plain is None:
            continue
        body = []
        for r in costed:
            cells = [r["variant"]]
            for key, spec in (
                ("gflop", ".3f"),
                ("mega_transcendentals", ".2f"),
                ("bytes_accessed_mb", ".1f"),
            ):
                value, base = r["xla"][key], plain[key]
                ratio = f"{value / base:.2f}" if base else "—"
                cells.append(f"{value:{spec}} ({ratio}×)")
            body.append(cells)
        lines += [
            "",
            f"XLA's cost analysis of one {name} training step (× plain):",
            "",
            *table(
                ["variant", "GFLOP", "transcendentals (M)", "bytes accessed (MB)"],
                body,
            ),
        ]
    return lines
