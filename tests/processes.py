"""Starting the workers of the multi-process tests: ports, environments, launches.

No framework imports: the workers import their backend themselves.
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import keras_rdrop

# Compiling is most of a tiny run's time on JAX; these programs need no speed.
FAST_XLA = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on localhost."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A free TCP port on localhost."""
    return free_ports(1)[0]


def child_env(backend: str, **extra: str) -> dict:
    """The environment of a worker: this checkout's `keras_rdrop` first on
    `PYTHONPATH`, `backend`, CPU only and one thread; `extra` on top."""
    env = dict(os.environ)
    root = str(Path(keras_rdrop.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["KERAS_BACKEND"] = backend
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU workers, even on a GPU machine
    env["OMP_NUM_THREADS"] = "1"
    if backend == "jax":
        env["JAX_PLATFORMS"] = "cpu"
        env.setdefault("XLA_FLAGS", FAST_XLA)
    env.update(extra)
    return env


def _end(proc) -> None:
    """Ends `proc` and what it started (torchrun's ranks): its process group."""
    if proc.poll() is None:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)  # the group of `proc` alone
        else:  # pragma: no cover
            proc.kill()
    proc.wait()


def launch_together(launches: dict, out_dir: Path, timeout_s: float, what: str):
    """Starts every `{name: (argv, env)}` of `launches` at once, and waits.

    Each writes its output to `out_dir / f"{name}.log"`. A launch that fails
    leaves the others waiting in a rendezvous or a collective: stop at the
    first failure (or at the deadline), end the rest, and fail the test with
    every launch's output.
    """
    children, codes = {}, {}
    try:
        for name, (command, env) in launches.items():
            log = open(out_dir / f"{name}.log", "w")  # closed in `finally`
            proc = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its own process group, for `_end`
            )
            children[name] = log, proc
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            codes = {name: proc.poll() for name, (_, proc) in children.items()}
            if all(c == 0 for c in codes.values()) or any(codes.values()):
                break
            time.sleep(0.2)
        still = (
            f"still running after {timeout_s:.0f} s, ended"
            if time.monotonic() >= deadline
            else "still running when another failed, ended"
        )
        codes = {name: still if c is None else c for name, c in codes.items()}
    finally:
        for log, proc in children.values():
            _end(proc)
            log.close()
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        logs = "\n".join(
            f"--- {name} ({codes[name]}): {' '.join(launches[name][0])}\n"
            + (out_dir / f"{name}.log").read_text()[-6000:]
            for name in launches
        )
        pytest.fail(f"{what} failed: {failed}\n{logs}", pytrace=False)
