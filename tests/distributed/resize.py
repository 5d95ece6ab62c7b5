"""A per-rank checkpoint saved by one number of ranks and loaded by another.

usage: resize.py save DIR CASES_JSON   (any number of ranks: train 6 steps, save model and per-rank parts)
       resize.py load DIR CASES_JSON   (another number of ranks: load, write what each rank loaded to
                                         DIR/<case>/loaded{r}.pt, train 4 more steps; rank 0 prints
                                         "RESULT <json>": replicas identical and finite per case)
"""
import json
import os
import sys

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import TinyNet, make_compression, replica_check, train_distributed  # noqa: E402


def main(mode, directory, cases_path):
    hvd.init()
    torch.set_num_threads(1)
    report = {}
    for case in json.load(open(cases_path)):
        folder = os.path.join(directory, case["id"])
        if mode == "save":
            model, compression = train_distributed(case, 6)
            compression.save_per_rank(folder)
            if hvd.rank() == 0:
                torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
            continue
        model = TinyNet()
        model.load_state_dict(torch.load(os.path.join(folder, "model.pt")))
        compression = make_compression(case, model)
        compression.load_per_rank(folder)
        torch.save({"worker_error": compression._worker_error, "server_error": compression._server_error,
                    "step": compression.stats()["steps"]}, os.path.join(folder, f"loaded{hvd.rank()}.pt"))
        model, compression = train_distributed(case, 4, model=model, compression=compression, start=6)
        report[case["id"]] = {**replica_check(model.parameters()), "steps": compression.stats()["steps"]}
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
