"""The experiments of ``scripts/reproduce.py``: one module per experiment, each with ``run(out, quick)``."""
