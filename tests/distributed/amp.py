"""Run under horovodrun with 2 ranks: Horovod's documented mixed-precision loop with ``torch.amp.GradScaler``
(``synchronize()``, ``unscale_``, ``skip_synchronize()`` + ``scaler.step``, ``update``), with overflows forced
on chosen ranks at chosen steps (one rank's loss times 1e39). Runs it dense (stock Horovod) and with
hvd_compress (Top-k + error feedback, DoubleSqueeze, DoubleSqueeze with the biases dense, default
``nonfinite="skip"``) from the same weights;
rank 0 prints RESULT {run: {"scales": [...], "skipped": n, "identical": bool, "finite": bool}}.

usage: amp.py STEPS
"""
import json
import os
import sys

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import TinyNet, batch, replica_check  # noqa: E402

import hvd_compress.torch as hc  # noqa: E402

# step: (rank whose gradient overflows, where); every rank knows the schedule. "loss": that rank's loss
# explodes (every gradient); "bias": only fc2.bias, a tensor that travels dense where dense_below=16
OVERFLOWS = {2: (1, "loss"), 5: (0, "bias"), 6: (1, "loss"), 9: (0, "bias")}


def run(kind, steps):
    model = TinyNet(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    compression = None
    if kind != "dense":
        compression = hc.Compression("topk:0.3", error_feedback=True, server="topk:0.5" if kind != "ef" else None,
                                     named_parameters=model.named_parameters(),
                                     dense_below=16 if kind == "ds-small-dense" else 0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         **({"compression": compression} if compression else {}))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)
    scales = []
    for step in range(steps):
        optimizer.zero_grad()
        x, y = batch(step, hvd.rank(), torch.float32)
        loss = ((model(x, step) - y) ** 2).mean()
        rank, where = OVERFLOWS.get(step, (None, None))
        if rank == hvd.rank():   # inf in float32
            loss = loss * 1e39 if where == "loss" else loss + model.fc2.bias.sum() * 1e39 * 1e39
        scaler.scale(loss).backward()
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()
        scales.append(scaler.get_scale())
    return {"scales": scales, **replica_check(model.parameters(), name=f"amp.check.{kind}"),
            "skipped": compression.stats()["skipped_steps"] if compression else None,
            "steps": compression.stats()["steps"] if compression else None}


def main(steps):
    hvd.init()
    torch.set_num_threads(1)
    results = {kind: run(kind, steps) for kind in ("dense", "ef", "ds", "ds-small-dense")}
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
