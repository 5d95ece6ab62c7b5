#!/usr/bin/env python
"""Benchmarks: ``python scripts/bench.py BENCHMARK [--quick] [--out DIR]``.

Each benchmark prints a table of ratios measured side by side in one run (absolute times are context only:
machines here are noisy) and writes results/bench/BENCHMARK.json (results/bench-quick/ with --quick, or DIR).
Exit code 0 when the benchmark ran and its checks passed, 1 otherwise.

  bytes    wire bytes per rank per step, counted from the tensors handed to Horovod, against dense and the formula
  kernels  compress+decompress throughput of every compressor (torch, TF) against memcpy and dense allreduce
  steps    training-step time with ranks in network namespaces over veth links limited by tc (needs root)
  model    the cost model fitted to the measurements, projected to 8 ... 1024 ranks (a plot)
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiments.common import ROOT, relpath, write_json  # noqa: E402

BENCHMARKS = {
    "bytes": "benchmarks.bytes",
    "kernels": "benchmarks.kernels",
    "steps": "benchmarks.steps",
    "model": "benchmarks.costmodel",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="small version, as the tests run it")
    parser.add_argument("--out", type=Path, help="output folder (default results/bench[-quick]/)")
    args = parser.parse_args(argv)

    out = args.out or ROOT / "results" / ("bench-quick" if args.quick else "bench")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    summary, ok = importlib.import_module(BENCHMARKS[args.benchmark]).run(out, args.quick)
    summary = {"benchmark": args.benchmark, "quick": args.quick, "ok": ok, **summary,
               "runtime_s": round(time.time() - start, 1)}
    write_json(out / f"{args.benchmark}.json", summary)
    for name, passed in summary.get("checks", {}).items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    print(f"{args.benchmark}{' (quick)' if args.quick else ''}: {'ok' if ok else 'FAILED'} in "
          f"{summary['runtime_s']} s; {relpath(out / (args.benchmark + '.json'))}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
