"""Per-process settings and facts shared by both kinds of worker.

Thread counts, the device sync a timer waits on, and the versions and device
recorded with every result.
"""

from __future__ import annotations

import os
import platform


def device_summary(kind: str) -> str:
    try:
        if kind in ("torch", "loop"):
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        elif kind == "jax":
            import jax

            return str(jax.devices()[0].device_kind)
        elif kind == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                return gpus[0].name
    except Exception:  # noqa: BLE001 - informative only
        pass
    return "cpu"


def set_framework_threads(kind: str, threads: int):
    """Caps the CPU threads a worker computes with, the same on every side.

    JAX is also pinned to that many cores when they are fewer than the
    machine's: its XLA CPU runtime keeps a thread pool whatever
    `--xla_cpu_multi_thread_eigen=false` says (measured here: 1.8 cores busy
    at "1 thread" when the second core was idle). TensorFlow and PyTorch obey
    their thread settings (CPU time equals wall time), and TensorFlow stalled
    for minutes in tf.data iterator teardown when pinned, so they are not.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if kind == "jax" and cores and threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    if kind in ("torch", "loop"):
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass
    elif kind == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    # JAX: XLA_FLAGS set by the driver before the process started.


def sync_fn(kind: str):
    """A function that waits until the device has finished the queued work."""
    if kind == "jax":
        import jax

        def sync(model):
            state = getattr(model, "_jax_state", None)
            if state:
                jax.block_until_ready(state)
            else:
                jax.block_until_ready([v.value for v in model.variables])

        return sync
    if kind in ("torch", "loop"):
        import torch

        if torch.cuda.is_available():
            return lambda model: torch.cuda.synchronize()
        return lambda model: None
    # TensorFlow: ops on the CPU run synchronously; on a GPU reading a
    # variable waits for the step that wrote it.
    return lambda model: model.optimizer.iterations.numpy()


def versions(kind: str) -> dict:
    out = {"python": platform.python_version()}
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except ImportError:
        pass
    if kind == "loop":
        import torch

        out["torch"] = torch.__version__
        return out
    import keras

    out["keras"] = keras.__version__
    module = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch"}[kind]
    out[module] = __import__(module).__version__
    return out
