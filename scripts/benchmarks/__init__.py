"""The benchmarks of ``python -m scripts.bench`` (scripts/bench.py), one module each (see that script)."""
