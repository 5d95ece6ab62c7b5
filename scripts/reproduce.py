"""Reproduce the seeds' experiments: ``python -m scripts.reproduce EXPERIMENT [--quick] [--out DIR]``.

Each experiment writes PNG plots and a summary.json to results/EXPERIMENT/ (results/EXPERIMENT-quick/ with
--quick, or DIR). The exit code is 0 when every check of the experiment passed, 1 when one failed (the
summary's "checks" say which).

  divergence  n = d = 3 Top-1 example on 3 Horovod ranks: growth 1 + 11 eta / 6, error feedback, DoubleSqueeze
  classes     empirical class constants (U / B1 / B2 / B3) of every compressor against theory, table rules
  cgd         compressed gradient descent on quadratics and linear regression, Top-5 vs Rand-5 (Fig. 2)
  variance    ||C(x)-x||^2/||x||^2 of real gradients of three CNNs: det vs unbiased natural, Top-k vs Rand-k (Fig. 1)
  training    a CNN on Fashion-MNIST on 4 ranks: no compression, Top-k, EF, DoubleSqueeze, QSGD, Fig. 3,
              SGD-momentum with the DGC recipe (with and without factor masking), AdamW on a small ViT with
              1-bit Adam's recipe and with its first moment compressed (MomentumCorrectedAdamW)
"""
import argparse
import sys
from pathlib import Path

from .experiments.common import ROOT, run_and_report

EXPERIMENTS = {
    "divergence": "scripts.experiments.divergence",
    "classes": "scripts.experiments.classes",
    "cgd": "scripts.experiments.cgd",
    "variance": "scripts.experiments.variance",
    "training": "scripts.experiments.training",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=list(EXPERIMENTS))
    parser.add_argument("--quick", action="store_true", help="small version (< 2 minutes), as the tests run it")
    parser.add_argument("--out", type=Path, help="output folder (default results/EXPERIMENT[-quick]/)")
    args = parser.parse_args(argv)

    out = args.out or ROOT / "results" / (args.experiment + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    ok = run_and_report(EXPERIMENTS[args.experiment], "experiment", args.experiment, out, args.quick,
                        out / "summary.json")
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
