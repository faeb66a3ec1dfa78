"""TensorFlow + XLA: the compiled train step's buffer assignment, from a dump.

JAX reports XLA's memory accounting directly (`memory.xla_memory`);
TensorFlow does not, so the worker asks XLA to dump the train step's buffer
assignment (`--xla_dump_to`) and reads the same `temp` and `arguments` sizes
back from the text.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from rdrop_bench.hlo_cost import cost_in


def tf_xla_dump_dir(spec: dict) -> str | None:
    """Makes TensorFlow's XLA dump the compiled train step's buffer assignment.

    Only with `jit_compile=True` (`--jit on`), one variant per process. Must
    run before TensorFlow is imported. The dump (a few MB of text and object
    files) goes to a temporary folder that `tf_xla_memory` reads and removes.
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


def tf_xla_memory(folder: str | None, cost_python: str | None = None) -> dict | None:
    """XLA's buffer assignment of TensorFlow's compiled train step, in MB.

    The counterpart of `memory.xla_memory` on JAX, read from the dump: `temp` is
    XLA's preallocated scratch buffer of the step (activations, gradients,
    temporaries at their peak), `arguments` the parameters passed in
    (variables, optimizer slots, the batch). With several compiled train
    steps (a retrace), the largest. With `cost_python` (a Python with JAX),
    also XLA's cost analysis of that step (`hlo_cost`), as JAX's has.
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
                best = (temp, arguments, path)
        if best is None:
            return {"error": "no XLA dump of the train step"}
        mb = 1 / 2**20
        out = {
            "temp_mb": best[0] * mb,
            "arguments_mb": best[1] * mb,
            "source": "XLA dump (TensorFlow)",
        }
        hlo = Path(str(best[2]).replace("-buffer-assignment.txt", ".txt"))
        if cost_python and hlo.exists():
            out.update(cost_in(cost_python, str(hlo)))
        return out
    except Exception as error:  # noqa: BLE001 - informative only
        return {"error": repr(error)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
