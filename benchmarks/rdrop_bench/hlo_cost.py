"""XLA's cost analysis of an HLO module given as text (a TensorFlow dump).

TensorFlow compiles its train step with XLA but reports no cost analysis;
JAX ships the same XLA with its cost model. A TensorFlow worker's dump of the
optimised step (`xla_dump.tf_xla_dump_dir`) is costed here, in a Python with
JAX, with the numbers `memory.xla_memory` gives for a JAX step:

    .tox/jax/bin/python -m rdrop_bench.hlo_cost STEP.cpu_after_optimizations.txt

prints `{"gflop": ..., "mega_transcendentals": ..., "bytes_accessed_mb": ...}`.
"""

from __future__ import annotations

import json
import subprocess
import sys


def cost_of_text(text: str) -> dict:
    """XLA's cost analysis of the HLO module `text`: GFLOP, transcendental
    operations (millions) and MB accessed, as `memory.xla_memory` names them."""
    import jax
    from jax._src.lib import xla_client
    from jaxlib import _hlo

    module = _hlo.hlo_module_from_text(text)
    client = jax.devices("cpu")[0].client
    cost = xla_client._xla.hlo_module_cost_analysis(client, module)
    return {
        "gflop": cost.get("flops", 0.0) / 1e9,
        "mega_transcendentals": cost.get("transcendentals", 0.0) / 1e6,
        "bytes_accessed_mb": cost.get("bytes accessed", 0.0) / 2**20,
    }


def cost_in(python: str, path: str) -> dict:
    """`cost_of_text` of the file at `path`, run by `python` (one with JAX)."""
    done = subprocess.run(
        [python, "-m", "rdrop_bench.hlo_cost", path],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
        | {"PYTHONPATH": __file__.rsplit("/rdrop_bench/", 1)[0]},
    )
    if done.returncode:
        return {"cost_error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(json.dumps(cost_of_text(handle.read())))
