"""Step time and memory of keras-rdrop against plain Keras and a PyTorch R-Drop loop.

The one entry point of the benchmark (`python benchmarks/bench.py --help`);
the driver also starts every worker process through it (`--worker`). The code
lives in the `rdrop_bench` package beside this file:

- `cli.py`: the options and `main`;
- `config.py`: variants, model sizes, variant names and their modifiers;
- `driver.py`: worker processes, interleaved rounds;
- `sources.py`: which keras_rdrop each worker imports (`--at-commit`,
  `--rdrop-src`) and the commit recorded for it;
- `worker.py`, `loop_worker.py`, `runtime.py`, `channel.py`: the worker side
  (Keras variants, the PyTorch loop, threads and syncs, the pipe, profiles);
- `memory.py`, `xla_dump.py`: memory probes (RSS, autograd, XLA, variables);
- `stats.py`, `report.py`: paired ratios and the markdown tables.

See `benchmarks/README.md` for the method and the results.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ is on sys.path when this file runs as a script; make it so when
# it is imported too (rdrop_bench, keras_models, torch_rdrop_loop).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rdrop_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
