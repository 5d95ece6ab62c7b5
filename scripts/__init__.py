"""Experiments and benchmarks, run from the repository root as modules: ``python -m scripts.reproduce EXPERIMENT``,
``python -m scripts.bench BENCHMARK`` (their workers too: ``python -m scripts.experiments.training_worker ...``)."""
