"""Run under mpirun with 3 ranks: the first seed's divergence example (n = d = 3, Top-1) through real Horovod.

f_i(x) = <a_i, x>^2 + ||x||^2 / 4 with a_1 = (-3, 2, 2), a_2 = (2, -3, 2), a_3 = (2, 2, -3), x0 = (1, 1, 1);
rank i holds f_i. For every step size three methods run, each with stock ``hvd.DistributedOptimizer`` and
``hvd_compress.torch.Compression``:

    plain          Top-1 on every worker                                  (at most PLAIN_STEPS steps)
    ef             Top-1 with worker error feedback                       (at most MAX_STEPS steps)
    doublesqueeze  error feedback + a Top-1 server pass (DoubleSqueeze: Top-1 on both sides)

Each run stops early once ||x|| leaves [LOW, HIGH] * ||x0|| (converged or diverged).

Rank 0 writes OUT_JSON: {mode: {eta: {"x": [x_0, x_1, ...], "bytes_sent": ...}}}.
usage: python -m scripts.experiments.divergence_worker OUT_JSON PLAIN_STEPS MAX_STEPS LOW HIGH ETA [ETA ...]
"""
import json
import math
import sys

import torch
import horovod.torch as hvd

import hvd_compress.torch as hc

A = torch.tensor([[-3.0, 2, 2], [2, -3, 2], [2, 2, -3]], dtype=torch.float64)
MODES = {"plain": {"error_feedback": False, "server": None},
         "ef": {"error_feedback": True, "server": None},
         "doublesqueeze": {"error_feedback": True, "server": hc.TopK(k=1)}}


def run(eta, steps, low, high, error_feedback, server):
    """The trajectory x_0, x_1, ... of one method; stops early once ||x|| leaves [low, high] * ||x_0||
    (every rank holds the same x, so every rank stops at the same step)."""
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    compression = hc.Compression(hc.TopK(k=1), error_feedback=error_feedback, server=server,
                                 named_parameters=model.named_parameters(), dense_below=0)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=eta),
                                         named_parameters=model.named_parameters(), compression=compression)
    a = A[hvd.rank()]
    x0 = model.x.detach().norm().item()
    trajectory = [model.x.detach().tolist()]
    for _ in range(steps):
        optimizer.zero_grad()
        ((a @ model.x) ** 2 + model.x @ model.x / 4).backward()
        optimizer.step()
        trajectory.append(model.x.detach().tolist())
        norm = model.x.detach().norm().item()
        if not math.isfinite(norm) or not low * x0 <= norm <= high * x0:
            break
    return {"x": trajectory, "bytes_sent": compression.stats()["bytes_sent"]}


def main(out, plain_steps, max_steps, low, high, *etas):
    hvd.init()
    if hvd.size() != 3:
        raise SystemExit(f"the example needs exactly 3 ranks, got {hvd.size()}")
    report = {mode: {} for mode in MODES}
    for eta in etas:
        for mode, options in MODES.items():
            steps = int(plain_steps if mode == "plain" else max_steps)
            report[mode][eta] = run(float(eta), steps, float(low), float(high), **options)
        if hvd.rank() == 0:
            print(f"eta={eta} done", flush=True)
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
