"""A tiny model, per-rank data and training loops shared by the multi-process workers and the tests.

``train_distributed`` runs under horovodrun (real Horovod collectives, stock DistributedOptimizer);
``train_reference`` runs the same steps in one process with ``hvd_compress.simulate.Simulation``.
"""
import os

import torch

from hvd_compress.simulate import Simulation
from hvd_compress.transport import Link

LR = 0.03


class TinyNet(torch.nn.Module):
    """Two layers, plus a head that only even steps use (a parameter without gradient on odd steps)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = torch.nn.Linear(6, 5, dtype=dtype)
        self.fc2 = torch.nn.Linear(5, 3, dtype=dtype)
        self.extra = torch.nn.Linear(6, 3, bias=False, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def forward(self, x, step):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return out + self.extra(x) if step % 2 == 0 else out


def batch(step, rank, dtype=torch.float64):
    gen = torch.Generator().manual_seed(10_000 * step + rank)
    return (torch.randn(8, 6, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(8, 3, generator=gen, dtype=torch.float64).to(dtype))


def loss_of(model, step, rank):
    weight = model.fc1.weight
    x, y = (t.to(weight.device) for t in batch(step, rank, weight.dtype))
    return ((model(x, step) - y) ** 2).mean()


def local_grads(model, step, rank, passes=1):
    """{name: gradient} of one rank at one step (zeros for parameters without gradient), summed over passes."""
    model.zero_grad(set_to_none=True)
    for k in range(passes):
        loss_of(model, passes * step + k, rank).backward()
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def new_model(case):
    """TinyNet in the case's dtype, on its device (``"device": "cuda"``; the CPU by default)."""
    return TinyNet(DTYPES[case.get("dtype", "float64")]).to(case.get("device", "cpu"))


def train_reference(case, n, steps):
    """Parameters after ``steps`` SGD steps of n simulated workers (half-precision gradients are compressed
    in float32, as the plug-in documents), on the case's device."""
    model = new_model(case)
    link = Link.gbit(case["link_gbps"]) if case.get("link_gbps") else None
    sim = Simulation(case["compressor"], case.get("error_feedback", False), case.get("server"), n=n,
                     transport=case.get("transport"), link=link, dense_below=case.get("dense_below", 0),
                     momentum=case.get("momentum", 0.0), warmup=case.get("warmup", 0),
                     clip=case.get("clip", 0.0), local_size=case.get("local_size", 1),
                     momentum_masking=case.get("momentum_masking", True), nesterov=case.get("nesterov", False))
    passes = case.get("backward_passes_per_step", 1)
    for step in range(steps):
        grads = [{k: g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
                  for k, g in local_grads(model, step, r, passes).items()} for r in range(n)]
        with torch.no_grad():
            for name, update in sim.step(grads).items():
                param = dict(model.named_parameters())[name]
                param.add_(update.to(param.dtype), alpha=-LR)   # as torch.optim.SGD does
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def train_distributed(case, steps, model=None, compression=None, start=0, process_set=None):
    """The same training with Horovod (on a process set: its ranks are the simulation's ranks 0..n-1);
    returns (model, compression)."""
    import horovod.torch as hvd

    process_set = process_set or hvd.global_process_set
    model = model or new_model(case)
    if compression is None:
        compression = make_compression(case, model)
    if os.environ.get("HVD_COMPRESS_TEST_DIRECT_CALLS") == "1":
        return train_direct(case, steps, model, compression, start)
    passes = case.get("backward_passes_per_step", 1)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), named_parameters=model.named_parameters(),
        compression=compression, backward_passes_per_step=passes, groups=case.get("groups"),
        process_set=process_set)
    for step in range(start, start + steps):
        optimizer.zero_grad()
        for k in range(passes):
            loss_of(model, passes * step + k, process_set.rank()).backward()
        optimizer.step()
    return model, compression


def train_direct(case, steps, model, compression, start=0):
    """The training of ``train_distributed`` with compress()/decompress() called as hvd.DistributedOptimizer
    calls them (it calls neither on one rank): per gradient in backward order, compress(), Horovod's average
    of what it returns, decompress() into .grad; a parameter without gradient sends zeros, as Horovod's does."""
    import horovod.torch as hvd

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    named = list(model.named_parameters())
    for step in range(start, start + steps):
        optimizer.zero_grad()
        loss_of(model, step, hvd.rank()).backward()
        sent = []
        for name, p in reversed(named):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            tensor, ctx = compression.compress(p.grad)
            sent.append((p, hvd.allreduce_async_(tensor, op=hvd.Average, name=f"direct.{name}"), ctx))
        for p, handle, ctx in sent:
            p.grad.set_(compression.decompress(hvd.synchronize(handle), ctx))
        optimizer.step()
    return model, compression


def replica_check(parameters, name="replica_check"):
    """{"identical": every rank holds bit-identical parameters, "finite": this rank's are finite}."""
    import horovod.torch as hvd
    flat = torch.cat([p.detach().reshape(-1) for p in parameters]).cpu()
    everyone = hvd.allgather(flat.unsqueeze(0), name=name)
    return {"identical": all(torch.equal(everyone[0], r) for r in everyone), "finite": bool(flat.isfinite().all())}


def make_compression(case, model, **options):
    import hvd_compress.torch as hc
    return hc.Compression(case["compressor"], error_feedback=case.get("error_feedback", False),
                          server=case.get("server"), named_parameters=model.named_parameters(),
                          transport=case.get("transport"), link_gbps=case.get("link_gbps"),
                          dense_below=case.get("dense_below", 0), bucket_mb=case.get("bucket_mb", 64),
                          momentum=case.get("momentum", 0.0), warmup=case.get("warmup", 0),
                          clip=case.get("clip", 0.0), momentum_masking=case.get("momentum_masking", True),
                          nesterov=case.get("nesterov", False),
                          **options)
