"""The PyTorch-loop worker: the hand-written loop of `torch_rdrop_loop.py`."""

from __future__ import annotations

import os
import time

from rdrop_bench import runtime
from rdrop_bench.channel import Channel, Profile
from rdrop_bench.memory import MemoryProbe, faults, saved_mb


def loop_worker(spec: dict):
    """PyTorch loop variants; memory is measured when there is only one."""
    channel = Channel()
    runtime.set_framework_threads("loop", spec["threads"])
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
    sync = runtime.sync_fn("loop")
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
                "device": runtime.device_summary("loop"),
                "versions": runtime.versions("loop"),
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
                start = (time.perf_counter(), time.process_time(), faults())
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
            faults=(faults() - start[2]) / (steps - skip),
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
        finished["autograd_saved_mb"] = saved_mb(
            lambda: trainer.step(*batches[0]), params
        )
    channel.send("done", memory={v: finished for v in variants})
