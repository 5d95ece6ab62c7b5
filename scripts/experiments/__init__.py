"""The experiments of ``python -m scripts.reproduce`` (scripts/reproduce.py): one module per experiment, each with
``run(out, quick)``."""
