"""Benchmarks: ``python -m scripts.bench BENCHMARK|all [--quick] [--out DIR]``.

Each benchmark prints a table of ratios measured side by side in one run (absolute times are context only:
machines here are noisy) and writes results/bench/BENCHMARK.json (results/bench-quick/ with --quick, or DIR).
Exit code 0 when the benchmark ran and its checks passed, 1 otherwise.

  bytes    wire bytes per rank per step, counted from the tensors handed to Horovod, against dense and the formula
  kernels  compress+decompress throughput of every compressor (torch, TF) against memcpy and dense allreduce
  steps    training-step time with ranks in network namespaces over veth links limited by tc (needs root)
  model    the cost model fitted to the measurements, projected to 8 ... 1024 ranks (a plot)
  nodes    2 emulated nodes x 2 ranks (scripts/cluster.py), tc-limited links between them: step time and bytes
           leaving each node for dense, flat and hierarchical transports (needs root)
  gpu      the PyTorch kernels on a CUDA device against a device-to-device copy (needs a GPU; not in "all";
           scripts/gpu_check.sh runs it with --out results/gpu)
  all      the first five, in this order (steps and nodes need root; about 30 minutes on 2 cores)
"""
import argparse
import sys
from pathlib import Path

from .experiments.common import ROOT, run_and_report

BENCHMARKS = {
    "bytes": "scripts.benchmarks.bytes",
    "kernels": "scripts.benchmarks.kernels",
    "steps": "scripts.benchmarks.steps",
    "model": "scripts.benchmarks.costmodel",
    "nodes": "scripts.benchmarks.nodes",
    "gpu": "scripts.benchmarks.gpu",
}
ALL = ["bytes", "kernels", "steps", "model", "nodes"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=list(BENCHMARKS) + ["all"])
    parser.add_argument("--quick", action="store_true", help="small version, as the tests run it")
    parser.add_argument("--out", type=Path, help="output folder (default results/bench[-quick]/)")
    args = parser.parse_args(argv)

    out = args.out or ROOT / "results" / ("bench-quick" if args.quick else "bench")
    out.mkdir(parents=True, exist_ok=True)
    names = ALL if args.benchmark == "all" else [args.benchmark]
    return 0 if all([run_one(name, out, args.quick) for name in names]) else 1


def run_one(name, out, quick):
    return run_and_report(BENCHMARKS[name], "benchmark", name, out, quick, out / f"{name}.json")

if __name__ == "__main__":
    sys.exit(main())
