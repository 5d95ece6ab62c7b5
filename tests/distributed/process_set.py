"""Run with mpirun on 3 ranks: Compression on a 2-of-3 process set (ranks 1 and 2; rank 0 stays out).

usage: process_set.py CASES_JSON OUT_DIR
Ranks 1 and 2 train every case with hvd.DistributedOptimizer(process_set=...) (the Compression takes the
optimizer's set, or is given it with "explicit": true; the root of the server pass is the set's first rank,
global rank 1), save their parameters (OUT_DIR/rank{r}.pt) and the case's state_dict(); then a Compression
given another set than its optimizer's must be refused. Rank 0 prints "RESULT <json>".
"""
import json
import os
import sys

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import TinyNet, make_compression, train_distributed  # noqa: E402


def main(cases_path, out_dir):
    pair, alone = hvd.ProcessSet([1, 2]), hvd.ProcessSet([0])
    hvd.init(process_sets=[pair, alone])
    torch.set_num_threads(1)
    report = {}
    if pair.included():
        results = {}
        for case in json.load(open(cases_path)):
            model = TinyNet()
            compression = make_compression(case, model, **({"process_set": pair} if case.get("explicit") else {}))
            model, compression = train_distributed(case, case["steps"], model, compression, process_set=pair)
            results[case["id"]] = {n: p.detach().clone() for n, p in model.named_parameters()}
            state = compression.state_dict()
            results[case["id"]]["_state"] = {"size": state["size"], "step": state["step"],
                                             "server_error": sorted(state["server_error"])}
        torch.save(results, os.path.join(out_dir, f"rank{hvd.rank()}.pt"))
        # a Compression told another process set than its optimizer's is refused at the first step, clearly
        model = TinyNet()
        compression = make_compression({"compressor": "topk:0.3"}, model, process_set=hvd.global_process_set)
        try:
            train_distributed({"compressor": "topk:0.3"}, 1, model, compression, process_set=pair)
            refused = "not refused"
        except ValueError as err:
            refused = str(err)
    else:
        refused = None
    refused = hvd.broadcast_object(refused, root_rank=1, name="refused")
    report["refused"] = refused
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
