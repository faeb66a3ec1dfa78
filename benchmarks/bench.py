"""Step time and memory of keras-rdrop against plain Keras and a PyTorch R-Drop loop.

Every variant trains in its own fresh worker process. A driver process starts
the workers of one backend (plus the PyTorch loop workers, which live for the
whole run), and then runs them one at a time in interleaved rounds
(A B C D ... A B C D ...): in each round every worker trains one epoch of the
same fixed batches while the others wait, so slow drift of the machine hits all
variants alike. The first round(s) are warm-up (tracing, XLA compilation) and
are dropped. Ratios are taken per round between variants of the same round and
their median is reported.

Run `python benchmarks/bench.py --help` for the options and
`benchmarks/README.md` for the method and the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BACKENDS = ("jax", "tensorflow", "torch")

# Keras variants, in round order. Each maps to the PyTorch loop variant it is
# compared with.
KERAS_VARIANTS = {
    "plain": "torch_plain",
    "wrapper": "torch_plain",
    "rdrop_seq": "torch_rdrop",
    "rdrop_concat": "torch_rdrop",
    "anchor": "torch_anchor",
    "rdrop_anchor": "torch_rdrop_anchor",
    # Diagnostic, not run by default: the anchor with its per-batch hooks
    # removed (see README, "anchor host sync").
    "anchor_nohooks": "torch_anchor",
    # Diagnostic: a variant plus a no-op `on_train_batch_end` callback, which
    # makes Keras wait for every step's logs on the main thread.
    "plain_sync": "torch_plain",
    "rdrop_seq_sync": "torch_rdrop",
    "rdrop_concat_sync": "torch_rdrop",
}
DIAGNOSTIC_VARIANTS = (
    "anchor_nohooks",
    "plain_sync",
    "rdrop_seq_sync",
    "rdrop_concat_sync",
)
LOOP_VARIANTS = ("torch_plain", "torch_rdrop", "torch_anchor", "torch_rdrop_anchor")
VARIANT_HELP = {
    "plain": "the inner model compiled and fit on its own",
    "wrapper": "RDropModel(alpha=0): the wrapper alone, one pass",
    "rdrop_seq": 'RDropModel(alpha=1, mode="sequential"): two passes',
    "rdrop_concat": 'RDropModel(alpha=1, mode="concat"): one pass on [x; x]',
    "anchor": "RDropModel(alpha=0) + ReferenceKLRegularizer(beta=0.1)",
    "rdrop_anchor": 'RDropModel(alpha=1, mode="concat") + ReferenceKLRegularizer',
    "anchor_nohooks": "diagnostic: anchor, ReferenceKLRegularizer without its "
    "on_train_batch_begin/end (no per-step host sync)",
    "<variant>_sync": "diagnostic: plain, rdrop_seq or rdrop_concat plus a no-op "
    "on_train_batch_end callback (a host sync per step, as the anchor has)",
    "torch_plain": "PyTorch loop, one pass",
    "torch_rdrop": "PyTorch loop from the R-Drop write-up, two passes",
    "torch_anchor": "PyTorch loop + frozen deepcopy reference, KL to it",
    "torch_rdrop_anchor": "PyTorch R-Drop loop + the reference KL",
}
QUICK_VARIANTS = ("plain", "rdrop_seq", "rdrop_concat", "anchor")
QUICK_LOOPS = ("torch_plain", "torch_rdrop")
# (steps per round, rounds, steps skipped at the start of each round)
FULL_SIZES = {
    "mlp": (20, 12, 2),
    "transformer": (4, 12, 1),
    "bert_tiny": (4, 8, 1),
    "lm50k": (3, 3, 1),
}
QUICK_SIZES = {
    "mlp": (10, 3, 2),
    "transformer": (3, 2, 1),
    "bert_tiny": (3, 2, 1),
    "lm50k": (2, 1, 1),
}
MODEL_NAMES = tuple(FULL_SIZES)
# The batch sizes (keras_models.MODELS holds them too).
MODELS_BATCH = {"mlp": 128, "transformer": 32, "bert_tiny": 32, "lm50k": 2}


# =====================================================================
# Worker side: one variant in one process.
# =====================================================================


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


def _faults() -> int:
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


class Channel:
    """JSON lines to the driver on the original stdout; commands on stdin.

    Everything else the process prints (libraries, C++ logs) goes to stderr,
    which the driver writes to a log file.
    """

    def __init__(self):
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, event: str, **fields):
        self._out.write(json.dumps({"event": event, **fields}) + "\n")
        self._out.flush()

    def wait(self) -> list[str]:
        if Profile.active:
            Profile.active.pause()
        line = sys.stdin.readline()
        if Profile.active:
            Profile.active.resume()
        if not line:
            raise SystemExit("driver went away")
        return line.split()


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


class Profile:
    """Optional profile of the timed rounds (not of the waits for the driver).

    `pyinstrument`: wall-clock sampling; writes the call tree (every frame)
    and a flat list by own time. `cprofile`: deterministic, timed with
    `time.process_time`, so time the process spends descheduled by other
    load on the machine is not counted; writes the top functions by
    cumulative and by own time.
    """

    active = None  # the profile the channel pauses while it waits

    def __init__(self, path: str | None, kind: str | None):
        self.path = path if kind else None
        self.kind = kind
        self.profiler = None
        self.running = False

    def start(self):
        if self.path and self.profiler is None:
            if self.kind == "cprofile":
                import cProfile

                self.profiler = cProfile.Profile(time.process_time)
            else:
                from pyinstrument import Profiler

                self.profiler = Profiler(interval=0.0005)
            Profile.active = self
            self.resume()

    def pause(self):
        if self.profiler is not None and self.running:
            (self.profiler.disable if self.kind == "cprofile" else self.profiler.stop)()
            self.running = False

    def resume(self):
        if self.profiler is not None and not self.running:
            (self.profiler.enable if self.kind == "cprofile" else self.profiler.start)()
            self.running = True

    def stop(self):
        if self.profiler is None:
            return
        self.pause()
        if self.kind == "cprofile":
            import io
            import pstats

            self.profiler.dump_stats(str(Path(self.path).with_suffix(".prof")))
            out = io.StringIO()
            stats = pstats.Stats(self.profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(40)
            text = out.getvalue()
        else:
            tree = self.profiler.output_text(unicode=True, show_all=True)
            flat = self.profiler.output_text(unicode=True, show_all=True, flat=True)
            text = tree + "\n\nFLAT (own time)\n" + flat
        Path(self.path).write_text(text)
        self.profiler = None
        Profile.active = None


def _device_summary(kind: str) -> str:
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


def _set_framework_threads(kind: str, threads: int):
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


def _sync_fn(kind: str):
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


def _build_keras_variant(variant, model_name, backend, jit, sync_every_step=False):
    """The model to fit and its extra callbacks, compiled like all the others."""
    import keras
    import keras_models

    from keras_rdrop import RDropModel, ReferenceKLRegularizer

    class SyncEveryStep(keras.callbacks.Callback):
        """A no-op `on_train_batch_end`: Keras then converts every step's logs
        to floats on the main thread (as with `verbose=1`), a host sync."""

        def on_train_batch_end(self, batch, logs=None):
            pass

    inner = keras_models.build_keras_model(model_name)
    callbacks = []
    if variant.endswith("_sync"):
        variant = variant[: -len("_sync")]
        sync_every_step = True
    if sync_every_step:
        callbacks.append(SyncEveryStep())
    if variant == "plain":
        model = inner
    else:
        one_pass = ("wrapper", "anchor", "anchor_nohooks")
        alpha = 0.0 if variant in one_pass else keras_models.ALPHA
        mode = "sequential" if variant == "rdrop_seq" else "concat"
        model = RDropModel(inner, alpha=alpha, mode=mode)
        if variant in ("anchor", "rdrop_anchor"):
            callbacks.append(ReferenceKLRegularizer(beta=keras_models.BETA))
        if variant == "anchor_nohooks":

            class NoBatchHooks(ReferenceKLRegularizer):
                # With a float beta and no refresh or soft update both hooks
                # do nothing; inheriting Keras' defaults lets fit dispatch
                # batch-end callbacks asynchronously again.
                on_train_batch_begin = keras.callbacks.Callback.on_train_batch_begin
                on_train_batch_end = keras.callbacks.Callback.on_train_batch_end

            callbacks.append(NoBatchHooks(beta=keras_models.BETA))
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=keras_models.LEARNING_RATE,
            weight_decay=keras_models.WEIGHT_DECAY,
            epsilon=keras_models.EPSILON,
            global_clipnorm=keras_models.CLIPNORM,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        # keras-hub tasks default to an accuracy metric ("auto"); no variant
        # computes metrics.
        metrics=None,
        jit_compile={"on": backend != "torch", "auto": "auto", "off": False}[jit],
    )
    return model, callbacks, inner


def _first_rows(x, n):
    """The first `n` rows of an array or of each array of a dict."""
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


def _saved_mb(step, params) -> float:
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


def _xla_memory(model, x, y) -> dict | None:
    """XLA's own accounting of the compiled JAX train step, in MB.

    `temp`: scratch buffers live during the step (activations, gradients,
    temporaries) at their peak, exact and free of allocator effects;
    `arguments`: the state and the batch passed in (weights, optimizer slots,
    the snapshot); `code`: the generated code. Recompiles `train_step` with
    the same shapes (after the timed rounds, so nothing is perturbed).
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
        return {
            "temp_mb": stats.temp_size_in_bytes * mb,
            "arguments_mb": stats.argument_size_in_bytes * mb,
            "outputs_mb": stats.output_size_in_bytes * mb,
            "code_mb": stats.generated_code_size_in_bytes * mb,
        }
    except Exception as error:  # noqa: BLE001 - informative only
        return {"error": repr(error)}


def _tf_xla_dump_dir(spec: dict) -> str | None:
    """Makes TensorFlow's XLA dump the compiled train step's buffer assignment.

    Only with `jit_compile=True` (`--jit on`), one variant per process. Must
    run before TensorFlow is imported. The dump (a few MB of text and object
    files) goes to a temporary folder that `_tf_xla_memory` reads and removes.
    """
    if spec["jit"] != "on" or len(spec["variants"]) != 1:
        return None
    import tempfile

    folder = tempfile.mkdtemp(prefix="bench-tf-xla-")
    flags = (
        f"--xla_dump_to={folder} --xla_dump_hlo_as_text "
        "--xla_dump_hlo_module_re=.*one_step_on_data.*"
    )
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    return folder


def _tf_xla_memory(folder: str | None) -> dict | None:
    """XLA's buffer assignment of TensorFlow's compiled train step, in MB.

    The counterpart of `_xla_memory` on JAX, read from the dump: `temp` is
    XLA's preallocated scratch buffer of the step (activations, gradients,
    temporaries at their peak), `arguments` the parameters passed in
    (variables, optimizer slots, the batch). With several compiled train
    steps (a retrace), the largest.
    """
    if folder is None:
        return None
    try:
        best = None
        for path in Path(folder).glob("*one_step_on_data*buffer-assignment.txt"):
            temp = arguments = 0
            for match in re.finditer(
                r"^allocation \d+: size (\d+), (.*)$", path.read_text(), re.M
            ):
                size, kind = int(match.group(1)), match.group(2)
                if kind.startswith("preallocated-temp"):
                    temp += size
                elif kind.startswith("parameter"):
                    arguments += size
            if best is None or temp > best[0]:
                best = (temp, arguments)
        if best is None:
            return {"error": "no XLA dump of the train step"}
        mb = 1 / 2**20
        return {
            "temp_mb": best[0] * mb,
            "arguments_mb": best[1] * mb,
            "source": "XLA dump (TensorFlow)",
        }
    except Exception as error:  # noqa: BLE001 - informative only
        return {"error": repr(error)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def keras_worker(spec: dict):
    """Keras variants of one backend.

    With one variant (the default), a single `fit` call runs every round: one
    epoch per round, the timer callback waiting for the driver at each epoch
    start, so the step function is traced and compiled once. With several
    variants in one process (`--processes per-backend`), each round is a
    `fit(epochs=1)` call of one variant, and memory is not measured.
    """
    channel = Channel()
    backend = os.environ["KERAS_BACKEND"]
    tf_xla_dump = _tf_xla_dump_dir(spec) if backend == "tensorflow" else None
    _set_framework_threads(backend, spec["threads"])
    import keras
    import keras_models

    import keras_rdrop

    model_name, variants = spec["model"], spec["variants"]
    batch_size = spec["batch_size"]
    steps, skip = spec["steps"], spec["skip"]
    keras.utils.set_random_seed(0)
    x, y = keras_models.make_data(model_name, steps * batch_size)
    built = {
        v: _build_keras_variant(
            v, model_name, backend, spec["jit"], spec.get("sync_every_step", False)
        )
        for v in variants
    }
    single = len(variants) == 1
    sync = _sync_fn(backend)
    memory = MemoryProbe()
    profile = Profile(spec.get("profile") if single else None, spec.get("profiler"))

    class RoundTimer(keras.callbacks.Callback):
        """Times steps `skip`..`steps` of each epoch; one epoch is one round.

        Only epoch hooks and `on_train_batch_begin` are overridden: a callback
        with `on_train_batch_end` makes Keras convert the logs to Python floats
        after every step on the main thread (a host sync), which would change
        what is measured.
        """

        def __init__(self, variant, command=None):
            super().__init__()
            self.variant = variant
            self.command = command

        def on_epoch_begin(self, epoch, logs=None):
            if single:
                self.command = channel.wait()
            if self.command[:2] != ["go", self.variant]:
                raise SystemExit(f"unexpected command {self.command}")
            self.start = None

        def on_train_batch_begin(self, batch, logs=None):
            if batch == skip:
                sync(self.model)
                self.start = (time.perf_counter(), time.process_time(), _faults())

        def on_epoch_end(self, epoch, logs=None):
            sync(self.model)
            wall, cpu = time.perf_counter(), time.process_time()
            if single and "reset" in self.command:
                memory.end_of_warmup()
                profile.start()
            self.result = {
                "variant": self.variant,
                "ms": (wall - self.start[0]) * 1000 / (steps - skip),
                "cpu_ms": (cpu - self.start[1]) * 1000 / (steps - skip),
                "faults": (_faults() - self.start[2]) / (steps - skip),
                "steps": steps - skip,
            }
            if single:
                channel.send("round", **self.result)

    channel.send(
        "ready",
        info={
            v: {
                "params": int(inner.count_params()),
                "jit_compile": model.jit_compile,
                "threads": spec["threads"],
                "cpus": sorted(os.sched_getaffinity(0)),
                "batch_size": batch_size,
                "device": _device_summary(backend),
                "versions": _versions(backend),
                "keras_rdrop_file": keras_rdrop.__file__,
            }
            for v, (model, _, inner) in built.items()
        },
    )
    fit_kwargs = {"batch_size": batch_size, "shuffle": False, "verbose": 0}
    if single:
        (variant,) = variants
        model, callbacks, _ = built[variant]
        memory.before_fit()
        model.fit(
            x,
            y,
            epochs=spec["epochs"],
            callbacks=[RoundTimer(variant), *callbacks],
            **fit_kwargs,
        )
        profile.stop()
        # Nothing more runs until the driver has timed every other worker.
        channel.wait()
        finished = memory.finish()
        xb, yb = _first_rows(x, batch_size), y[:batch_size]
        if backend == "jax":
            finished["xla"] = _xla_memory(model, xb, yb)
        if backend == "tensorflow":
            finished["xla"] = _tf_xla_memory(tf_xla_dump)
        if backend == "torch":
            data = keras.tree.map_structure(keras.ops.convert_to_tensor, (xb, yb))
            finished["autograd_saved_mb"] = _saved_mb(
                lambda: model.train_step(data), [v.value for v in model.variables]
            )
        channel.send("done", memory={variant: finished})
        return
    while True:
        command = channel.wait()
        if command[0] == "stop":
            break
        model, callbacks, _ = built[command[1]]
        timer = RoundTimer(command[1], command)
        start = time.perf_counter()
        model.fit(x, y, epochs=1, callbacks=[timer, *callbacks], **fit_kwargs)
        # The whole fit() call, setup and (re)tracing included.
        channel.send("round", fit_s=time.perf_counter() - start, **timer.result)
    channel.send("done", memory={v: None for v in variants})


def loop_worker(spec: dict):
    """PyTorch loop variants; memory is measured when there is only one."""
    channel = Channel()
    _set_framework_threads("loop", spec["threads"])
    import keras_models
    import torch
    import torch_rdrop_loop as loop

    model_name, variants = spec["model"], spec["variants"]
    batch_size = spec["batch_size"]
    steps, skip = spec["steps"], spec["skip"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = loop.make_batches(model_name, steps, batch_size, device=device)
    trainers = {}
    for variant in variants:
        torch.manual_seed(0)
        model = loop.build_model(model_name).to(device)
        trainers[variant] = loop.Trainer(
            model,
            variant,
            alpha=keras_models.ALPHA,
            beta=keras_models.BETA,
            lr=keras_models.LEARNING_RATE,
            weight_decay=keras_models.WEIGHT_DECAY,
            max_grad_norm=keras_models.CLIPNORM,
        )
    activation_bytes = loop.saved_activation_bytes(model, *batches[0])
    single = len(variants) == 1
    sync = _sync_fn("loop")
    memory = MemoryProbe()
    profile = Profile(spec.get("profile") if single else None, spec.get("profiler"))
    channel.send(
        "ready",
        info={
            v: {
                "params": loop.param_count(t.model),
                "activation_bytes": activation_bytes,
                "weight_bytes": sum(
                    p.numel() * p.element_size() for p in t.model.parameters()
                ),
                "jit_compile": False,
                "threads": spec["threads"],
                "cpus": sorted(os.sched_getaffinity(0)),
                "batch_size": batch_size,
                "device": _device_summary("loop"),
                "versions": _versions("loop"),
            }
            for v, t in trainers.items()
        },
    )
    memory.before_fit()
    while True:
        command = channel.wait()
        if command[0] == "stop":
            break
        variant = command[1]
        trainer = trainers[variant]
        for i, (xb, yb) in enumerate(batches):
            if i == skip:
                sync(None)
                start = (time.perf_counter(), time.process_time(), _faults())
            loss = trainer.step(xb, yb)
        loss.item()  # what a logging loop does once per epoch; waits for the step
        sync(None)
        wall, cpu = time.perf_counter(), time.process_time()
        if single and "reset" in command:
            memory.end_of_warmup()
            profile.start()
        channel.send(
            "round",
            variant=variant,
            ms=(wall - start[0]) * 1000 / (steps - skip),
            cpu_ms=(cpu - start[1]) * 1000 / (steps - skip),
            faults=(_faults() - start[2]) / (steps - skip),
            steps=steps - skip,
        )
    profile.stop()
    finished = memory.finish() if single else None
    if finished is not None:
        (variant,) = variants
        trainer = trainers[variant]
        params = list(trainer.model.parameters())
        if trainer.ref_model is not None:
            params += list(trainer.ref_model.parameters())
        finished["autograd_saved_mb"] = _saved_mb(
            lambda: trainer.step(*batches[0]), params
        )
    channel.send("done", memory={v: finished for v in variants})


def _versions(kind: str) -> dict:
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


# =====================================================================
# Driver side.
# =====================================================================


class Worker:
    """A worker process and a thread that reads its JSON lines into a queue."""

    def __init__(self, key, kind, python, spec, env, log_path):
        self.key, self.kind = key, kind
        self.variants = list(spec["variants"])
        self.spec = spec
        self.log_path = log_path
        self.info: dict = {}
        self.memory: dict = {}
        self.messages: queue.Queue = queue.Queue()
        cmd = [python, str(HERE / "bench.py"), "--worker", json.dumps(spec)]
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
            cwd=str(REPO),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.messages.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self.messages.put(None)

    def expect(self, event: str, timeout: float) -> dict:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise RuntimeError(
                f"{self.key}: no {event!r} within {timeout:.0f} s; log: {self.log_path}"
            ) from None
        if message is None or message.get("event") != event:
            self.proc.wait(timeout=30)
            tail = Path(self.log_path).read_text()[-3000:]
            raise RuntimeError(
                f"{self.key}: worker exited (rc={self.proc.returncode}) while "
                f"waiting for {event!r}; log {self.log_path}:\n{tail}"
            )
        return message

    def send(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self):
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()


# Where the workers import keras_rdrop from: the working tree, or a snapshot of
# a commit (`--at-commit`).
SOURCE = {"path": REPO, "commit": None}


def _child_env(backend: str | None, threads: int) -> dict:
    env = dict(os.environ)
    # keras_rdrop (working tree or snapshot) and the benchmark modules first.
    paths = [str(SOURCE["path"]), str(HERE)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if backend:
        env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONWARNINGS"] = "ignore"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if backend == "jax" and threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    return env


def _resolve_python(backend: str, overrides: dict, all_backends: bool) -> str:
    if backend in overrides:
        return overrides[backend]
    env_name = "torch" if backend == "loop" else backend
    tox_python = REPO / ".tox" / env_name / "bin" / "python"
    if all_backends and tox_python.exists():
        return str(tox_python)
    if _has_module(sys.executable, "torch" if backend == "loop" else backend):
        return sys.executable
    if tox_python.exists():
        return str(tox_python)
    raise SystemExit(
        f"No Python with {backend} found: pass --python {backend}=/path/to/python"
    )


def _has_module(python: str, module: str) -> bool:
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec(module) is not None
    code = (
        "import importlib.util, sys; "
        f"sys.exit(importlib.util.find_spec({module!r}) is None)"
    )
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def _git_state() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()

    if SOURCE["commit"]:
        return {
            "commit": git("rev-parse", "--short", SOURCE["commit"]),
            "keras_rdrop_dirty": False,
            "source": f"git archive of {SOURCE['commit']}",
        }
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "keras_rdrop_dirty": bool(git("status", "--porcelain", "keras_rdrop")),
        "source": "working tree",
    }


def _snapshot(rev: str) -> Path:
    """Extracts keras_rdrop/ at `rev` into a temporary folder."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="keras_rdrop-bench-"))
    archive = subprocess.run(
        ["git", "archive", rev, "keras_rdrop"], cwd=REPO, capture_output=True
    )
    if archive.returncode:
        raise SystemExit(f"git archive {rev} failed: {archive.stderr.decode()}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def _machine() -> dict:
    cpu = platform.processor() or "unknown"
    if shutil.which("lscpu"):
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        match = re.search(r"Model name:\s+(.+)", out)
        if match:
            cpu = match.group(1).strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def run_model(args, model_name: str, log_dir: Path) -> dict:
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    steps, rounds, skip = sizes[model_name]
    steps = args.steps or steps
    rounds = args.rounds or rounds
    skip = skip if args.skip_steps is None else args.skip_steps
    if steps <= skip:
        raise SystemExit(f"--steps ({steps}) must exceed --skip-steps ({skip})")
    warmup = args.warmup_rounds
    if warmup < 1:
        raise SystemExit("--warmup-rounds must be at least 1")
    epochs = warmup + rounds
    batch_size = args.batch_size or MODELS_BATCH[model_name]
    profile_dir = log_dir / "profiles" if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    per_variant = args.processes == "per-variant"

    def start(kind, variants, python, env):
        name = f"{model_name}-{kind}-{'+'.join(variants)}"
        spec = {
            "model": model_name,
            "variants": variants,
            "steps": steps,
            "skip": skip,
            "epochs": epochs,
            "batch_size": batch_size,
            "threads": args.threads,
            "jit": args.jit,
            "sync_every_step": args.sync_every_step,
        }
        if profile_dir:
            spec["profile"] = str(profile_dir / f"{name}.txt")
            spec["profiler"] = args.profile
        return Worker(name, kind, python, spec, env, log_dir / f"{name}.log")

    def split(variants):
        return [[v] for v in variants] if per_variant else [list(variants)]

    import keras_models  # numpy only

    result = {
        "model": model_name,
        "batch_size": batch_size,
        # One float32 logits tensor of a batch, for models whose output
        # dominates memory (lm50k); None otherwise.
        "logits_bytes": keras_models.logits_bytes(model_name, batch_size),
        "logits_shape": keras_models.logits_shape(model_name, batch_size),
        "steps_per_round": steps,
        "skipped_steps_per_round": skip,
        "rounds": rounds,
        "warmup_rounds": warmup,
        "processes": args.processes,
        "groups": [],
    }
    loop_env = _child_env(None, args.threads)
    loops = [
        start("loop", vs, args.pythons["loop"], loop_env)
        for vs in (split(args.loop_variants) if args.loop_variants else [])
    ]
    try:
        for w in loops:
            w.info = w.expect("ready", args.timeout)["info"]
        loops_warm = False
        for backend in args.backends:
            env = _child_env(backend, args.threads)
            t0 = time.perf_counter()
            load_start = os.getloadavg()
            group = [
                start(backend, vs, args.pythons[backend], env)
                for vs in split(args.variants)
            ]
            for w in group:
                w.info = w.expect("ready", args.timeout)["info"]
            print(
                f"[{model_name}/{backend}] {len(group)} worker process(es) ready in "
                f"{time.perf_counter() - t0:.0f} s; {warmup} warm-up + {rounds} "
                f"rounds of {steps} steps, batch {batch_size}",
                flush=True,
            )
            rounds_of = {v: [] for w in group + loops for v in w.variants}
            for r in range(epochs):
                t_round = time.perf_counter()
                for w in group + loops:
                    for v in w.variants:
                        fresh = not (w.kind == "loop" and loops_warm)
                        reset = r == warmup - 1 and fresh
                        w.send(f"go {v}" + (" reset" if reset else ""))
                        message = w.expect("round", args.timeout)
                        message["warmup"] = r < warmup
                        rounds_of[v].append(message)
                label = "warm-up" if r < warmup else f"round {r - warmup + 1}"
                print(
                    f"  {label} ({time.perf_counter() - t_round:.0f} s): "
                    + " ".join(f"{v}={m[-1]['ms']:.1f}" for v, m in rounds_of.items()),
                    flush=True,
                )
            loops_warm = True
            memory = {}
            for w in group:
                w.send("stop")
                memory.update(w.expect("done", args.timeout)["memory"])
                w.close()
            info = {v: i for w in group for v, i in w.info.items()}
            result["groups"].append(
                {
                    "backend": backend,
                    "load_avg_start_end": [load_start, os.getloadavg()],
                    "workers": [
                        {
                            "variant": v,
                            "info": info[v],
                            "rounds": rounds_of[v],
                            "memory": memory[v],
                        }
                        for v in args.variants
                    ],
                    "loop_rounds": {v: rounds_of[v] for w in loops for v in w.variants},
                }
            )
        memory = {}
        for w in loops:
            w.send("stop")
            memory.update(w.expect("done", args.timeout)["memory"])
            w.close()
        info = {v: i for w in loops for v, i in w.info.items()}
        result["loops"] = [
            {"variant": v, "info": info[v], "memory": memory[v]}
            for v in args.loop_variants
        ]
    finally:
        for w in loops:
            w.kill()
    return result


# =====================================================================
# Report.
# =====================================================================


def _timed(rounds, key="ms"):
    return [r[key] for r in rounds if not r["warmup"]]


def _paired_ratio(a, b):
    """Median over rounds of a[i] / b[i]: both measured in the same round."""
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    return statistics.median(ratios) if ratios else None


def _fmt(value, spec=".2f", suffix=""):
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _row(backend, variant, info, own, plain, peer, peer_rounds, mem, plain_mem):
    """`own`, `plain`, `peer_rounds`: lists of round messages (or None)."""
    ms, cpu = _timed(own), _timed(own, "cpu_ms")

    def ratio(other, key):
        return _paired_ratio(_timed(own, key), _timed(other, key)) if other else None

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
            statistics.median(_timed(own, "faults"))
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
        "peak_rss_mb": get(mem, "steady_peak_mb"),
        "warmup_peak_mb": get(mem, "warmup_peak_mb"),
        "growth_mb": get(mem, "steady_growth_mb"),
        "retained_mb": get(mem, "retained_mb"),
        "transient_mb": get(mem, "step_transient_mb"),
        "growth_vs_plain_mb": delta("steady_growth_mb"),
        "transient_vs_plain_mb": delta("step_transient_mb"),
        "xla": None if mem is None else mem.get("xla"),
        "saved_mb": None if mem is None else mem.get("autograd_saved_mb"),
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
        plain = workers.get("plain")
        for variant, w in workers.items():
            peer = KERAS_VARIANTS[variant]
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
            row["vs_plain"] = _paired_ratio(_timed(a), _timed(b))
            row["vs_plain_cpu"] = _paired_ratio(
                _timed(a, "cpu_ms"), _timed(b, "cpu_ms")
            )
        rows.append(row)
    return {"rows": rows, "activation_mb": activation_mb, "weight_mb": weight_mb}


def _exact(row) -> str:
    """XLA scratch + arguments (JAX, TF with XLA) or autograd-saved (PyTorch)."""
    xla, saved = row.get("xla"), row.get("saved_mb")
    if xla and "temp_mb" in xla:
        return f"XLA temp {xla['temp_mb']:.1f}, args {xla['arguments_mb']:.1f}"
    if saved is not None:
        return f"saved {saved:.1f}"
    return "—"


def _table(header, rows):
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
            f"Parameters: Keras {_fmt(params.get(False), ',')}, PyTorch "
            f"{_fmt(params.get(True), ',')}. Ratios are medians of per-round "
            "ratios.",
            "",
        ]
        lines += _table(
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
            ],
            [
                [
                    r["backend"],
                    r["variant"],
                    f"{r['median']:.2f}",
                    f"{r['min']:.2f}",
                    f"{r['max']:.2f}",
                    f"{r['cpu_median']:.2f}",
                    _fmt(r["faults_median"], ".0f"),
                    f"{_fmt(r['vs_plain'])} / {_fmt(r['vs_plain_cpu'])}",
                    f"{_fmt(r['vs_peer'])} / {_fmt(r['vs_peer_cpu'])} ({r['peer']})"
                    if r["peer"]
                    else "—",
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
            else _table(
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
                ],
                [
                    [
                        r["backend"],
                        r["variant"],
                        _fmt(r["peak_rss_mb"], ".0f"),
                        _fmt(r["growth_mb"], ".1f"),
                        _fmt(r["growth_vs_plain_mb"], "+.1f"),
                        _fmt(r["retained_mb"], ".1f"),
                        _fmt(r["transient_mb"], ".1f"),
                        _fmt(r["transient_vs_plain_mb"], "+.1f"),
                        _exact(r),
                    ]
                    for r in measured
                ],
            )
        )
        lines += [
            "",
            "One set of activations (tensors autograd saves in one PyTorch "
            f"training forward pass): {_fmt(summary['activation_mb'], '.1f')} MB; "
            f"one copy of the weights: {_fmt(summary['weight_mb'], '.1f')} MB.",
            "",
        ]
        if result.get("logits_bytes") and measured:
            lines += copies_table(result, measured) + [""]
        lines += targets(summary)
    return "\n".join(lines) + "\n"


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
                _fmt(value, ".1f"),
                _fmt(per_logits(value), ".2f"),
                _fmt(delta, "+.1f"),
                _fmt(per_logits(delta), "+.2f"),
                _fmt(growth, ".1f"),
                _fmt(per_logits(growth), ".2f"),
                _fmt(per_logits(d_growth), "+.2f"),
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
        *_table(
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
        budget += weights or 0.0
    mark = "met" if round(delta, 1) <= round(budget, 1) else "MISSED"
    return f"{delta:+.1f} ≤ {budget:.1f} ({kind}) {mark}"


def targets(summary: dict) -> list[str]:
    rows = summary["rows"]
    weights, activations = summary["weight_mb"], summary["activation_mb"]
    by = {(r["backend"], r["variant"]): r for r in rows}
    backends = [
        b for b in dict.fromkeys(r["backend"] for r in rows) if b != "PyTorch loop"
    ]

    def cells(variant, key, limit=None, spec=".2f"):
        out = []
        for b in backends:
            r = by.get((b, variant))
            value = None if r is None else r[key]
            text = _fmt(value, spec)
            cpu = None if r is None else r.get(key + "_cpu")
            if cpu is not None:
                text += f" (CPU {cpu:{spec}})"
            if value is not None and limit is not None:
                hits = [v <= limit for v in (value, cpu) if v is not None]
                text += (
                    " met"
                    if all(hits)
                    else " MISSED"
                    if not any(hits)
                    else " borderline"
                )
            out.append(text)
        return out

    faster = []
    for b in backends:
        seq, concat = by.get((b, "rdrop_seq")), by.get((b, "rdrop_concat"))
        if seq is None or concat is None:
            faster.append("—")
            continue
        # Paired per round, like every other ratio here.
        wall = _paired_ratio(concat["timed_ms"], seq["timed_ms"])
        cpu = _paired_ratio(concat["timed_cpu_ms"], seq["timed_cpu_ms"])
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
    return _table(["target", *backends], body)


# =====================================================================
# CLI.
# =====================================================================


def parse_args(argv=None):
    variants = "\n".join(f"  {k:<19} {v}" for k, v in VARIANT_HELP.items())
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"variants:\n{variants}\n\nexamples:\n"
        "  KERAS_BACKEND=jax python benchmarks/bench.py --quick\n"
        "  python benchmarks/bench.py --all-backends --model all\n",
    )
    parser.add_argument(
        "--model",
        choices=(*MODEL_NAMES, "all"),
        default=None,
        help="model to benchmark: mlp, transformer (hand-written), bert_tiny "
        "(keras-hub BertTextClassifier, BERT-tiny size, from config), lm50k "
        "(per-position logits over a 50,257 vocabulary, for memory), or all "
        "(default: mlp and transformer; mlp with --quick)",
    )
    parser.add_argument(
        "--all-backends",
        action="store_true",
        help="run jax, tensorflow and torch (each from .tox/<backend>/bin/python "
        "when it exists) instead of only $KERAS_BACKEND",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated backends to run (default: $KERAS_BACKEND)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated Keras variants (default: all; with --quick: "
        + ",".join(QUICK_VARIANTS)
        + ")",
    )
    parser.add_argument(
        "--loops",
        default=None,
        help="comma-separated PyTorch loop variants, or 'none' (default: the "
        "peers of the Keras variants run; with --quick: " + ",".join(QUICK_LOOPS) + ")",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 min)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per round")
    parser.add_argument(
        "--skip-steps",
        type=int,
        default=None,
        help="untimed steps at the start of each round (cold caches after the "
        "switch between processes)",
    )
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument(
        "--sync-every-step",
        action="store_true",
        help="give every Keras variant a no-op on_train_batch_end callback, so "
        "fit waits for each step's logs on the main thread (as with verbose=1 "
        "or any batch-end callback, ReferenceKLRegularizer included); default: "
        "fit(verbose=0) with no batch-end callback (asynchronous on jax and torch)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="override the batch size (default: mlp 128, transformer 32, "
        "bert_tiny 32, lm50k 2)",
    )
    parser.add_argument(
        "--processes",
        choices=("per-variant", "per-backend"),
        default=None,
        help="per-variant: a fresh process per variant, one fit call for all "
        "rounds, memory measured (default); per-backend: all variants of a "
        "backend in one process, one fit call per round, no memory (default "
        "with --quick: starts faster)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per worker: torch.set_num_threads, TF intra/inter-op "
        "threads, OMP/MKL env, XLA_FLAGS for JAX, and, below the core count, "
        "the worker pinned to that many cores (XLA ignores the rest). Default "
        "1: on a shared 2-core machine, multi-threaded runs stall when another "
        "process is busy",
    )
    parser.add_argument(
        "--jit",
        choices=("on", "auto", "off"),
        default="on",
        help="on: jit_compile=True on jax and tensorflow, eager on torch; "
        "auto: Keras' default (no XLA for TF on CPU); off: jit_compile=False",
    )
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="BACKEND=PATH",
        help="interpreter for a backend (jax, tensorflow, torch) or for the "
        "PyTorch loop (loop)",
    )
    parser.add_argument(
        "--out",
        default=str(HERE / "results"),
        help="folder for the JSON, the markdown table and the worker logs",
    )
    parser.add_argument("--tag", default=None, help="name of the result files")
    parser.add_argument(
        "--at-commit",
        default=None,
        metavar="REV",
        help="benchmark keras_rdrop/ as of a git revision (extracted with git "
        "archive) instead of the working tree, e.g. HEAD while it is being edited",
    )
    parser.add_argument(
        "--profile",
        choices=("pyinstrument", "cprofile"),
        default=None,
        help="profile the timed rounds of each worker (pyinstrument must be "
        "installed in each env; cprofile counts CPU time); timings are then "
        "distorted. Profiles go to <out>/logs/<tag>/profiles/",
    )
    parser.add_argument("--timeout", type=float, default=600, help="per message")
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="print the markdown tables of earlier result files and exit",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        (loop_worker if spec["variants"][0] in LOOP_VARIANTS else keras_worker)(spec)
        return
    if args.report:
        run = merge_runs([json.loads(Path(path).read_text()) for path in args.report])
        text = markdown(run)
        print(text)
        if args.tag:
            out = Path(args.out)
            (out / f"{args.tag}.json").write_text(json.dumps(run, indent=1))
            (out / f"{args.tag}.md").write_text(text)
            print(f"results: {out / args.tag}.json\n         {out / args.tag}.md")
        return

    if args.all_backends:
        backends = list(BACKENDS)
    elif args.backends:
        backends = args.backends.split(",")
    else:
        backends = [os.environ.get("KERAS_BACKEND", "tensorflow")]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {BACKENDS}")
    args.backends = backends
    overrides = dict(item.split("=", 1) for item in args.python)
    multi = args.all_backends or len(backends) > 1
    args.pythons = {b: _resolve_python(b, overrides, multi) for b in backends}

    if args.processes is None:
        args.processes = "per-backend" if args.quick else "per-variant"
    if args.variants:
        args.variants = args.variants.split(",")
    else:
        args.variants = [
            v
            for v in (QUICK_VARIANTS if args.quick else KERAS_VARIANTS)
            if v not in DIAGNOSTIC_VARIANTS
        ]
    if args.loops == "none":
        args.loop_variants = []
    elif args.loops:
        args.loop_variants = args.loops.split(",")
    elif args.quick:
        args.loop_variants = list(QUICK_LOOPS)
    else:
        peers = {KERAS_VARIANTS.get(v) for v in args.variants}
        args.loop_variants = [v for v in LOOP_VARIANTS if v in peers]
    for v in args.variants:
        if v not in KERAS_VARIANTS:
            raise SystemExit(
                f"unknown variant {v!r}; choose from {list(KERAS_VARIANTS)}"
            )
    for v in args.loop_variants:
        if v not in LOOP_VARIANTS:
            raise SystemExit(f"unknown loop {v!r}; choose from {list(LOOP_VARIANTS)}")
    if args.loop_variants:
        args.pythons["loop"] = _resolve_python("loop", overrides, multi)
    if args.model is None:
        models = ["mlp"] if args.quick else ["mlp", "transformer"]
    elif args.model == "all":
        models = list(MODEL_NAMES)
    else:
        models = [args.model]

    if args.at_commit:
        SOURCE["path"], SOURCE["commit"] = _snapshot(args.at_commit), args.at_commit
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = args.tag or f"{stamp}-{'-'.join(backends)}-{'-'.join(models)}" + (
        "-quick" if args.quick else ""
    )
    out = Path(args.out)
    log_dir = out / "logs" / tag
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": _machine(),
            "threads": args.threads,
            "jit": args.jit,
            "quick": args.quick,
            "processes": args.processes,
            "sync_every_step": args.sync_every_step,
            "profile": args.profile,
            "backends": backends,
            "pythons": args.pythons,
            "git": _git_state(),
            "argv": sys.argv[1:] if argv is None else argv,
        },
        "results": [],
    }
    for model_name in models:
        run["results"].append(run_model(args, model_name, log_dir))
    run["meta"]["wall_s"] = time.perf_counter() - started
    versions = {}
    for result in run["results"]:
        for group in result["groups"]:
            for w in group["workers"]:
                versions[group["backend"]] = w["info"]["versions"]
        for w in result.get("loops", []):
            versions["loop"] = w["info"]["versions"]
    run["meta"]["versions"] = versions
    json_path = out / f"{tag}.json"
    md_path = out / f"{tag}.md"
    json_path.write_text(json.dumps(run, indent=1))
    text = markdown(run)
    md_path.write_text(text)
    print()
    print(text)
    print(f"total {run['meta']['wall_s']:.0f} s")
    print(f"results: {json_path}\n         {md_path}\nworker logs: {log_dir}")


if __name__ == "__main__":
    main()
