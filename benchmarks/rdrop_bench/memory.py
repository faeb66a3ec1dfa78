"""Memory probes run inside a worker: resident set, autograd, XLA's accounting.

Resident-set numbers come from `/proc/self/status` (Linux); the exact numbers
from autograd's saved-tensor hooks (torch), XLA's `memory_analysis()` (JAX),
and, for TensorFlow with XLA, the buffer assignment in `xla_dump.py`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def _proc_status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def _peak_rss_kb() -> int:
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _rss_kb() -> int | None:
    return _proc_status_kb("VmRSS")


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def faults() -> int:
    """Minor page faults of this process so far (fresh pages from the OS)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _malloc_trim():
    """Returns freed heap pages to the OS (glibc), so RSS counts live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Resident-set size around training, from /proc/self/status.

    `before_fit`: VmRSS after the model, optimizer and data exist, before
    `fit` (optimizer slots and the compiled step do not exist yet).
    `end_of_warmup`: VmRSS and peak (VmHWM) after the warm-up rounds, then
    VmHWM is reset to the current RSS (`/proc/self/clear_refs`).
    `finish`: VmHWM after the timed rounds: the peak of the timed steps.
    """

    def __init__(self):
        self.rss_before_fit_kb = None
        self.rss_after_warmup_kb = None
        self.warmup_peak_kb = None
        self.reset_ok = False

    def before_fit(self):
        self.rss_before_fit_kb = _rss_kb() or _peak_rss_kb()

    def end_of_warmup(self):
        _malloc_trim()
        self.rss_after_warmup_kb = _rss_kb()
        self.warmup_peak_kb = _peak_rss_kb()
        self.reset_ok = _reset_peak_rss()

    def finish(self):
        steady_peak = _peak_rss_kb()
        before = self.rss_before_fit_kb
        after_warmup = self.rss_after_warmup_kb or before
        mb = 1 / 1024
        return {
            "rss_before_fit_mb": before * mb,
            "rss_after_warmup_mb": after_warmup * mb,
            "warmup_peak_mb": (self.warmup_peak_kb or steady_peak) * mb,
            "steady_peak_mb": steady_peak * mb,
            # What training adds at its peak, once compiled: state kept
            # between steps (optimizer slots, snapshot, compiled programs,
            # allocator caches) plus the transient peak inside a step.
            "steady_growth_mb": (steady_peak - before) * mb,
            "retained_mb": (after_warmup - before) * mb,
            "step_transient_mb": (steady_peak - after_warmup) * mb,
            "peak_reset_ok": self.reset_ok,
        }


def saved_mb(step, params) -> float:
    """MB of tensors autograd saves for backward during `step()` (PyTorch).

    Each storage counted once, the parameters' own storages left out: the
    activations a training step keeps alive until its backward pass.
    """
    import torch

    skip = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) / 2**20


def xla_memory(model, x, y) -> dict | None:
    """XLA's own accounting of the compiled JAX train step, in MB.

    `temp`: scratch buffers live during the step (activations, gradients,
    temporaries) at their peak, exact and free of allocator effects;
    `arguments`: the state and the batch passed in (weights, optimizer slots,
    the snapshot); `code`: the generated code. Also XLA's cost analysis of
    the step: GFLOP, transcendental operations (millions) and bytes
    accessed. Recompiles `train_step` with the same shapes (after the timed
    rounds, so nothing is perturbed).
    """
    try:
        import jax

        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables],
        )
        spec = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (state, (x, y))
        )
        compiled = jax.jit(model.train_step, donate_argnums=0).lower(*spec).compile()
        stats = compiled.memory_analysis()
        mb = 1 / 2**20
        out = {
            "temp_mb": stats.temp_size_in_bytes * mb,
            "arguments_mb": stats.argument_size_in_bytes * mb,
            "outputs_mb": stats.output_size_in_bytes * mb,
            "code_mb": stats.generated_code_size_in_bytes * mb,
        }
        # XLA's count of the work in one step: floating-point operations,
        # transcendental ones (exp, log, ...) and bytes read and written.
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost:
            out.update(
                gflop=cost.get("flops", 0.0) / 1e9,
                mega_transcendentals=cost.get("transcendentals", 0.0) / 1e6,
                bytes_accessed_mb=cost.get("bytes accessed", 0.0) * mb,
            )
        return out
    except Exception as error:  # noqa: BLE001 - informative only
        return {"error": repr(error)}


def variable_bytes(variables) -> int:
    """Bytes held by `variables`, each variable counted once."""
    seen, total = set(), 0
    for v in variables:
        if id(v) in seen:
            continue
        seen.add(id(v))
        size = 1
        for n in v.shape:
            size *= int(n)
        total += size * _itemsize(v.dtype)
    return total


def _itemsize(dtype) -> int:
    import numpy as np

    name = str(getattr(dtype, "name", dtype))
    if name == "bfloat16":
        return 2
    return np.dtype(name).itemsize


def variable_breakdown(model, inner) -> dict:
    """MB of the variables of `model` and of the inner model it wraps.

    `extra_mb` is what the wrapper holds besides the inner model: for
    `RDropModel` with `ReferenceKLRegularizer`, the snapshot (exact, no
    allocator involved). `trainable_mb`: the inner model's trainable weights
    (with LoRA, the adapters and the head). Optimizer slots are listed apart.
    """
    mb = 1 / 2**20
    total = variable_bytes(model.variables)
    own = variable_bytes(inner.variables)
    return {
        "model_variables_mb": total * mb,
        "inner_variables_mb": own * mb,
        "extra_mb": (total - own) * mb,
        "extra_bytes": total - own,
        "trainable_mb": variable_bytes(inner.trainable_variables) * mb,
        "optimizer_mb": variable_bytes(model.optimizer.variables) * mb,
    }
