"""Run under horovodrun with 2 ranks: training loops of real models that once broke hvd_compress.

usage: real_loops.py SCENARIO STEPS
  gan      two models trained alternately, each with its own DistributedOptimizer and Compression: a GAN's
           discriminator step, then its generator step with the discriminator's requires_grad off
  sparse   nn.Embedding(sparse=True) beside dense layers: the sparse gradient goes Horovod's own way (allgather),
           the dense ones compressed
Rank 0 prints RESULT {"identical": bool, "finite": bool, "steps": [...], "losses": [...]}.
"""
import json
import os
import sys

import torch
import horovod.torch as hvd

import hvd_compress.torch as hc

sys.path.insert(0, os.path.dirname(__file__))
from common import replica_check  # noqa: E402


def distributed(model, lr=0.05):
    compression = hc.Compression("topk:0.3", error_feedback=True, named_parameters=model.named_parameters(),
                                 dense_below=0)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr),
                                         named_parameters=model.named_parameters(), compression=compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return optimizer, compression


def gan(steps, gen):
    """Each iteration a discriminator step, then a generator step with the discriminator frozen."""
    g_net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6))
    d_net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1))
    g_opt, g_comp = distributed(g_net)
    d_opt, d_comp = distributed(d_net)
    softplus, losses = torch.nn.functional.softplus, []
    for step in range(steps):
        noise, real = torch.randn(8, 4, generator=gen), torch.randn(8, 6, generator=gen) + 2
        for p in d_net.parameters():
            p.requires_grad_(True)
        d_opt.zero_grad()
        d_loss = (softplus(-d_net(real)) + softplus(d_net(g_net(noise).detach()))).mean()
        d_loss.backward()
        d_opt.step()
        for p in d_net.parameters():
            p.requires_grad_(False)
        g_opt.zero_grad()
        g_loss = softplus(-d_net(g_net(noise))).mean()
        g_loss.backward()
        g_opt.step()
        losses.append([d_loss.item(), g_loss.item()])
    return [g_net, d_net], [g_comp, d_comp], losses


def sparse(steps, gen):
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(50, 8, sparse=True), "head": torch.nn.Linear(8, 1)})
    opt, comp = distributed(model)
    losses = []
    for step in range(steps):
        ids, target = torch.randint(50, (16,), generator=gen), torch.randn(16, 1, generator=gen)
        opt.zero_grad()
        loss = ((model["head"](model["emb"](ids)) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return [model], [comp], losses


def main(scenario, steps):
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(100 + hvd.rank())   # each rank its own data
    models, comps, losses = {"gan": gan, "sparse": sparse}[scenario](steps, gen)
    check = replica_check([p for m in models for p in m.parameters()], name="check")
    if hvd.rank() == 0:
        print("RESULT " + json.dumps({**check,
                                      "steps": [c.stats()["steps"] for c in comps], "losses": losses}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
