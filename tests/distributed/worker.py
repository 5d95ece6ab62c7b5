"""Run under horovodrun: train every case of a JSON file and save each rank's parameters.

usage: worker.py CASES_JSON OUT_DIR   (writes OUT_DIR/rank{r}.pt = {case id: {name: tensor}}, and under
"_where" the rank's host name and Horovod's local and cross ranks)
"""
import json
import os
import socket
import sys

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import train_distributed  # noqa: E402


def main(cases_path, out_dir):
    hvd.init()
    torch.set_num_threads(1)
    with open(cases_path) as f:
        cases = json.load(f)
    results = {"_where": {"host": socket.gethostname(), "local": (hvd.local_rank(), hvd.local_size()),
                          "cross": (hvd.cross_rank(), hvd.cross_size())}}
    for case in cases:
        model, compression = train_distributed(case, case["steps"])
        results[case["id"]] = {n: p.detach().clone() for n, p in model.named_parameters()}
        results[case["id"]]["_stats"] = compression.stats()
    torch.save(results, os.path.join(out_dir, f"rank{hvd.rank()}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
