"""The examples run as files (``python examples/pytorch_fashion_mnist.py``); this file only makes the folder a
package for the experiments, which import ``examples.fmnist_data`` (run from the repository root as modules)."""
