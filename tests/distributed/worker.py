"""Run under horovodrun: train every case of a JSON file and save each rank's parameters.

usage: worker.py CASES_JSON OUT_DIR   (writes OUT_DIR/rank{r}.pt = {case id: {name: CPU tensor}}, and under
"_where" the rank's host name and Horovod's local and cross ranks). A case with "resume_at": k saves the
state at step k and goes on with a fresh model and Compression that load it.
"""
import json
import os
import socket
import sys

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import make_compression, new_model, train_distributed  # noqa: E402


def main(cases_path, out_dir):
    hvd.init()
    torch.set_num_threads(1)
    with open(cases_path) as f:
        cases = json.load(f)
    results = {"_where": {"host": socket.gethostname(), "local": (hvd.local_rank(), hvd.local_size()),
                          "cross": (hvd.cross_rank(), hvd.cross_size())}}
    for case in cases:
        env = {**case.get("env", {}), **case.get("env_on_rank", {}).get(str(hvd.rank()), {})}
        os.environ.update(env)   # for this case only
        if case.get("resume_at"):   # state_dict() there, then a fresh model and Compression load it and go on
            model, compression = train_distributed(case, case["resume_at"])
            state, weights = compression.state_dict(), model.state_dict()
            model = new_model(case)
            model.load_state_dict(weights)
            compression = make_compression(case, model)
            compression.load_state_dict(state)
            model, compression = train_distributed(case, case["steps"] - case["resume_at"], model, compression,
                                                   start=case["resume_at"])
        else:
            model, compression = train_distributed(case, case["steps"])
        results[case["id"]] = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
        results[case["id"]]["_stats"] = compression.stats()
        # hierarchical: which buckets the node averaged in shared memory
        results[case["id"]]["_node_rows"] = [isinstance(b.node_rows, torch.Tensor) for b in compression._buckets]
        for key in env:
            del os.environ[key]
    torch.save(results, os.path.join(out_dir, f"rank{hvd.rank()}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
