"""Run under horovodrun/mpirun with 3 ranks: the first seed's divergence example through real Horovod.

f_i(x) = <a_i, x>^2 + ||x||^2 / 4 with a_1 = (-3, 2, 2), a_2 = (2, -3, 2), a_3 = (2, 2, -3), x0 = (1, 1, 1),
Top-1 on every worker. Rank 0 prints one JSON line: the per-step growth factors x_{k+1}/x_k of plain Top-1
and the norms reached with error feedback, for each step size.
usage: counterexample.py PLAIN_STEPS EF_STEPS ETA [ETA ...]
"""
import json
import sys

import torch
import horovod.torch as hvd

import hvd_compress.torch as hc

A = torch.tensor([[-3.0, 2, 2], [2, -3, 2], [2, 2, -3]], dtype=torch.float64)


def run(eta, steps, error_feedback):
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    compression = hc.Compression(hc.TopK(k=1), error_feedback=error_feedback,
                                 named_parameters=model.named_parameters(), dense_below=0)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=eta),
                                         named_parameters=model.named_parameters(), compression=compression)
    a = A[hvd.rank()]
    trajectory = [model.x.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        ((a @ model.x) ** 2 + model.x @ model.x / 4).backward()
        optimizer.step()
        trajectory.append(model.x.detach().clone())
    return trajectory


def main(plain_steps, ef_steps, *etas):
    hvd.init()
    if hvd.size() != 3:
        raise SystemExit(f"the example needs exactly 3 ranks, got {hvd.size()}")
    report = {}
    for eta in map(float, etas):
        plain = run(eta, int(plain_steps), error_feedback=False)
        ef = run(eta, int(ef_steps), error_feedback=True)
        report[str(eta)] = {
            "growth": [(b / a).tolist() for a, b in zip(plain, plain[1:])],
            "expected_growth": 1 + 11 * eta / 6,
            "ef_norms": [x.norm().item() for x in ef],
        }
    if hvd.rank() == 0:
        print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
