"""The driver: starts the worker processes and runs them in interleaved rounds."""

from __future__ import annotations

import json
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from rdrop_bench.config import (
    FULL_SIZES,
    HERE,
    MODELS_BATCH,
    NO_LOOP_MODELS,
    QUICK_SIZES,
    REPO,
    parse_variant,
)
from rdrop_bench.sources import source_path


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


def child_env(backend: str | None, threads: int, label: str | None = None) -> dict:
    """The environment of a worker: paths, backend and thread settings.

    `label`: the `@LABEL` of the variant, whose keras_rdrop source goes first
    on `PYTHONPATH` (None: the default source).
    """
    env = dict(os.environ)
    # keras_rdrop (working tree, snapshot or labelled tree) and the
    # benchmark modules first.
    paths = [str(source_path(label)), str(HERE)]
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


def resolve_python(backend: str, overrides: dict, all_backends: bool) -> str:
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


def machine() -> dict:
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
            "cost_python": getattr(args, "cost_python", None),
        }
        if profile_dir:
            spec["profile"] = str(profile_dir / f"{name}.txt")
            spec["profiler"] = args.profile
        return Worker(name, kind, python, spec, env, log_dir / f"{name}.log")

    def split(variants, keras=True):
        """One process per variant, or per backend and keras_rdrop source."""
        if per_variant:
            return [[v] for v in variants]
        if not keras:
            return [list(variants)]
        by_source = {}
        for v in variants:
            by_source.setdefault(parse_variant(v)["source"], []).append(v)
        return list(by_source.values())

    def source_label(variants):
        return parse_variant(variants[0])["source"]

    # The PyTorch loop has no peer of some models (e.g. the keras-hub LoRA one).
    loop_variants = [] if model_name in NO_LOOP_MODELS else args.loop_variants

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
    loop_env = child_env(None, args.threads)
    loops = [
        start("loop", vs, args.pythons["loop"], loop_env)
        for vs in (split(loop_variants, keras=False) if loop_variants else [])
    ]
    try:
        for w in loops:
            w.info = w.expect("ready", args.timeout)["info"]
        loops_warm = False
        for backend in args.backends:
            t0 = time.perf_counter()
            load_start = os.getloadavg()
            group = [
                start(
                    backend,
                    vs,
                    args.pythons[backend],
                    child_env(backend, args.threads, source_label(vs)),
                )
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
            {"variant": v, "info": info[v], "memory": memory[v]} for v in loop_variants
        ]
    finally:
        for w in loops:
            w.kill()
    return result
