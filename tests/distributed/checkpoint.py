"""Run under horovodrun: checkpoint at step 10 and resume must equal an uninterrupted run at step 20.

For each case: run A trains 20 steps; run B trains 10, saves model + compression.state_dict() to one file
from rank 0 (as users do), then a fresh model, optimizer and Compression load that file on every rank and
train 10 more; run C does the same with the per-rank form (compression.save_per_rank / load_per_rank into a
folder). Rank 0 prints "RESULT <json>" with, per case and form, whether parameters and every error buffer
match. usage: checkpoint.py CASES_JSON CHECKPOINT_PATH
"""
import json
import os
import sys

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import TinyNet, make_compression, train_distributed  # noqa: E402



def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def main(cases_path, path):
    hvd.init()
    torch.set_num_threads(1)
    report = {}
    for case in json.load(open(cases_path)):
        straight, straight_comp = train_distributed(case, 20)
        for form in ("one file", "per rank"):
            first, first_comp = train_distributed(case, 10)
            if form == "one file":
                state = {"model": first.state_dict(), "compression": first_comp.state_dict()}
                if hvd.rank() == 0:
                    torch.save(state, path)
            else:
                first_comp.save_per_rank(path + ".d")
                if hvd.rank() == 0:
                    torch.save({"model": first.state_dict()}, path)
            hvd.barrier()
            saved = torch.load(path)
            model = TinyNet()
            model.load_state_dict(saved["model"])
            compression = make_compression(case, model)
            if form == "one file":
                compression.load_state_dict(saved["compression"])
            else:
                compression.load_per_rank(path + ".d")
            resumed, resumed_comp = train_distributed(case, 10, model=model, compression=compression, start=10)
            report[f"{case['id']} ({form})"] = {
                "parameters_equal": same(straight.state_dict(), resumed.state_dict()),
                "error_buffers_equal": same(straight_comp.state_dict(), resumed_comp.state_dict()),
                "nonzero_buffers": any(t.abs().sum() > 0 for w in resumed_comp.state_dict()["worker_error"]
                                       for t in w.values()),
            }
            hvd.barrier()
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
