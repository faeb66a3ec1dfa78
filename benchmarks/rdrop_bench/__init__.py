"""The benchmark's code; `benchmarks/bench.py` is its entry point."""
