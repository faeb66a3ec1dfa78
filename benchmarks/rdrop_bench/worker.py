"""The Keras worker: one variant (or, with --processes per-backend, several) in
one process, trained in rounds the driver starts one at a time."""

from __future__ import annotations

import os
import time

from rdrop_bench import runtime
from rdrop_bench.channel import Channel, Profile
from rdrop_bench.config import parse_variant
from rdrop_bench.memory import (
    MemoryProbe,
    faults,
    saved_mb,
    variable_breakdown,
    xla_memory,
)
from rdrop_bench.xla_dump import tf_xla_dump_dir, tf_xla_memory


def build_keras_variant(variant, model_name, backend, jit, sync_every_step=False):
    """The model to fit and its extra callbacks, compiled like all the others."""
    import keras
    import keras_models

    from keras_rdrop import RDropModel, ReferenceKLRegularizer

    class SyncEveryStep(keras.callbacks.Callback):
        """A no-op `on_train_batch_end`: Keras then converts every step's logs
        to floats on the main thread (as with `verbose=1`), a host sync."""

        def on_train_batch_end(self, batch, logs=None):
            pass

    parsed = parse_variant(variant)
    base = parsed["base"]
    # `share_prefix` is passed only where it is off, so that a variant can
    # run a keras_rdrop from before it existed (`@LABEL`).
    options = {"share_prefix": False} if base.endswith("_unshared") else {}
    base = base.removesuffix("_unshared")
    inner = keras_models.build_keras_model(model_name)
    callbacks = []
    if sync_every_step or parsed["sync"]:
        callbacks.append(SyncEveryStep())
    if base == "plain":
        model = inner
    else:
        one_pass = ("wrapper", "anchor", "anchor_nohooks")
        alpha = 0.0 if base in one_pass else keras_models.ALPHA
        mode = "sequential" if base == "rdrop_seq" else "concat"
        model = RDropModel(inner, alpha=alpha, mode=mode, **options)
        if base in ("anchor", "rdrop_anchor"):
            callbacks.append(ReferenceKLRegularizer(beta=keras_models.BETA))
        if base == "anchor_nohooks":

            class NoBatchHooks(ReferenceKLRegularizer):
                # With a float beta and no refresh or soft update both hooks
                # do nothing; inheriting Keras' defaults lets fit dispatch
                # batch-end callbacks asynchronously again.
                on_train_batch_begin = keras.callbacks.Callback.on_train_batch_begin
                on_train_batch_end = keras.callbacks.Callback.on_train_batch_end

            callbacks.append(NoBatchHooks(beta=keras_models.BETA))
    jit_compile = {"on": backend != "torch", "auto": "auto", "off": False}[jit]
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
        jit_compile=True if parsed["jit"] else jit_compile,
    )
    return model, callbacks, inner


def _dynamo_summary() -> dict:
    """What torch.compile did: graph breaks (by reason) and graphs compiled."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {"error": "torch._dynamo not available"}
    breaks = dict(counters["graph_break"])
    return {
        "graph_breaks": sum(breaks.values()),
        "unique_graph_breaks": len(breaks),
        "graph_break_reasons": dict(sorted(breaks.items(), key=lambda kv: -kv[1])[:20]),
        "unique_graphs": counters["stats"].get("unique_graphs"),
        "calls_captured": counters["stats"].get("calls_captured"),
    }


def _first_rows(x, n):
    """The first `n` rows of an array or of each array of a dict."""
    if isinstance(x, dict):
        return {k: v[:n] for k, v in x.items()}
    return x[:n]


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
    tf_xla_dump = tf_xla_dump_dir(spec) if backend == "tensorflow" else None
    runtime.set_framework_threads(backend, spec["threads"])
    import keras
    import keras_models

    import keras_rdrop

    model_name, variants = spec["model"], spec["variants"]
    batch_size = spec["batch_size"]
    steps, skip = spec["steps"], spec["skip"]
    keras.utils.set_random_seed(0)
    x, y = keras_models.make_data(model_name, steps * batch_size)
    built = {
        v: build_keras_variant(
            v, model_name, backend, spec["jit"], spec.get("sync_every_step", False)
        )
        for v in variants
    }
    single = len(variants) == 1
    sync = runtime.sync_fn(backend)
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
                self.start = (time.perf_counter(), time.process_time(), faults())

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
                "faults": (faults() - self.start[2]) / (steps - skip),
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
                "device": runtime.device_summary(backend),
                "versions": runtime.versions(backend),
                "keras_rdrop_file": keras_rdrop.__file__,
            }
            for v, (model, _, inner) in built.items()
        },
    )
    fit_kwargs = {"batch_size": batch_size, "shuffle": False, "verbose": 0}
    if single:
        (variant,) = variants
        model, callbacks, inner = built[variant]
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
            finished["xla"] = xla_memory(model, xb, yb)
        if backend == "tensorflow":
            finished["xla"] = tf_xla_memory(tf_xla_dump, spec.get("cost_python"))
        if backend == "torch" and model.jit_compile is True:
            finished["torch_compile"] = _dynamo_summary()
        # Exact bytes of the variables (the anchor's snapshot: extra_mb).
        finished["variables"] = variable_breakdown(model, inner)
        # Autograd's saved tensors of an eager step; a torch.compile'd step
        # saves what its compiled graph decides, which these hooks cannot see.
        if backend == "torch" and model.jit_compile is not True:
            data = keras.tree.map_structure(keras.ops.convert_to_tensor, (xb, yb))
            finished["autograd_saved_mb"] = saved_mb(
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
