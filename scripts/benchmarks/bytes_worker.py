"""Run under horovodrun / mpirun: count the bytes every rank hands to Horovod's collectives per training step.

For each configuration (compressor, mode, transport) a small conv + linear model trains a few steps with stock
``hvd.DistributedOptimizer(compression=hvd_compress.torch.Compression(...))``. Every tensor handed to a
horovod.torch collective is counted at the one place all of them pass: the private ``_allreduce_async``,
``_allgather_async``, ``_broadcast_async``, ... functions of ``horovod.torch.mpi_ops``. The public functions
(``hvd.allgather_async``, ``hvd.allreduce_async``, ``hvd.broadcast_async_``, ``hvd.alltoall_async``,
``hvd.reducescatter_async`` and their synchronous and grouped forms) and the ``allreduce_async_`` that
``horovod.torch.optimizer`` imported by name all look those up as module globals at call time, so patching
them catches every path once, independently of ``Compression.stats()``.

Rank 0 writes OUT_JSON: {"params", "tensors", "rows": [{config, "skipped" or "ranks": [per-rank steps]}]}.
usage: python -m scripts.benchmarks.bytes_worker OUT_JSON CONFIGS_JSON WARMUP_STEPS COUNTED_STEPS
"""
import json
import sys
import time
from collections import defaultdict

import torch
import horovod.torch as hvd
import horovod.torch.mpi_ops as mpi_ops

import hvd_compress.torch as hc


class Net(torch.nn.Module):
    """A realistic layer mix (~0.96M parameters in 10 tensors): two convolutions, a batch norm, two linear
    layers; the small tensors (biases, batch norm) make the fixed per-tensor overheads visible."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(32)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 7 * 7, 300)
        self.fc2 = torch.nn.Linear(300, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


# ---- counting ---------------------------------------------------------------------------------------------

class Counter:
    """Bytes of the tensors this rank hands to collectives, by collective and by purpose, while ``on``."""

    def __init__(self):
        self.on, self.param_names = False, set()
        self.reset()

    def reset(self):
        self.by_kind, self.by_purpose, self.received = defaultdict(int), defaultdict(int), 0

    def purpose(self, name):
        if name is None:
            return "other"
        if name.startswith("hc.w."):
            return "worker payload"
        if name.startswith("hc.s."):
            return "server payload"
        if name == "hc.not_finite":
            return "finiteness flags"
        if name.startswith("hc."):
            return name
        # horovod.torch.optimizer names its allreduce after the parameter: what compress() returned
        return "step markers (optimizer allreduce)" if name in self.param_names else "other"

    def add(self, kind, name, tensors, sender=True):
        if not self.on:
            return
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if not sender:           # a broadcast's receive buffer: nothing leaves this rank
            self.received += nbytes
            return
        self.by_kind[kind] += nbytes
        self.by_purpose[self.purpose(name)] += nbytes

    def snapshot(self):
        return {"counted": sum(self.by_kind.values()), "by_kind": dict(self.by_kind),
                "by_purpose": dict(self.by_purpose), "broadcast_received": self.received}


COUNTER = Counter()


def install_counter():
    def wrap(fn, kind, grouped=False, name_at=2):
        def counted(*args, **kwargs):
            tensors = list(args[0]) if grouped else [args[0]]
            COUNTER.add(kind, args[name_at], tensors)
            return fn(*args, **kwargs)
        return counted

    def broadcast(fn):
        def counted(tensor, output, root_rank, name, *rest, **kwargs):
            COUNTER.add("broadcast", name, [tensor], sender=hvd.rank() == root_rank)
            return fn(tensor, output, root_rank, name, *rest, **kwargs)
        return counted

    # (private function, collective, grouped, position of the name argument)
    for attr, kind, grouped, name_at in [("_allreduce_async", "allreduce", False, 2),
                                         ("_grouped_allreduce_async", "allreduce", True, 2),
                                         ("_allgather_async", "allgather", False, 2),
                                         ("_grouped_allgather_async", "allgather", True, 2),
                                         ("_alltoall_async", "alltoall", False, 4),
                                         ("_reducescatter_async", "reducescatter", False, 2),
                                         ("_grouped_reducescatter_async", "reducescatter", True, 2)]:
        if hasattr(mpi_ops, attr):
            setattr(mpi_ops, attr, wrap(getattr(mpi_ops, attr), kind, grouped, name_at))
    mpi_ops._broadcast_async = broadcast(mpi_ops._broadcast_async)


# ---- one configuration --------------------------------------------------------------------------------------

def compression_for(cfg, model):
    """hc.Compression for cfg, or (None, reason) when this Compression does not offer the combination.
    Every rank takes the same branch (no collective runs here), so a skip never hangs a job."""
    kwargs = {"error_feedback": cfg["mode"] != "plain",
              "server": cfg["compressor"] if cfg["mode"] == "doublesqueeze" else None}
    try:
        return hc.Compression(cfg["compressor"], named_parameters=model.named_parameters(),
                              transport=cfg["transport"], dense_below=0, **kwargs), None
    except TypeError as err:
        if "transport" not in str(err):
            raise
        if not cfg["builtin"]:
            return None, "Compression has no transport= argument yet"
        # no transport= yet: the built-in transport is what Compression does without the argument
        return hc.Compression(cfg["compressor"], named_parameters=model.named_parameters(), dense_below=0,
                              **kwargs), None
    except ValueError as err:
        return None, f"refused: {err}"


def run_config(cfg, warmup, counted, batch):
    torch.manual_seed(0)
    model = Net()
    if cfg["compressor"] == "dense":    # Horovod's own fp32 allreduce, no hvd_compress: the baseline
        compression, skipped = hvd.Compression.none, None
    else:
        compression, skipped = compression_for(cfg, model)
    if skipped:
        return {"skipped": skipped}
    COUNTER.param_names = {name for name, _ in model.named_parameters()}
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                         named_parameters=model.named_parameters(), compression=compression)
    g = torch.Generator().manual_seed(1000 + hvd.rank())
    steps = []
    for step in range(warmup + counted):
        x = torch.randn(batch, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        COUNTER.reset()
        COUNTER.on = step >= warmup    # the first step also checks the configuration (a one-off allgather)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        COUNTER.on = False
        if step >= warmup:
            record = COUNTER.snapshot()
            record["stats_bytes_sent"] = compression.stats()["bytes_sent"] if cfg["compressor"] != "dense" else None
            steps.append(record)
    return {"steps": steps}


def main(out, configs_path, warmup, counted, batch="8"):
    hvd.init()
    torch.set_num_threads(1)
    install_counter()
    configs = json.loads(open(configs_path).read())
    model = Net()
    shapes = {name: p.numel() for name, p in model.named_parameters()}
    rows = []
    for cfg in configs:
        start = time.time()
        result = run_config(cfg, int(warmup), int(counted), int(batch))
        everyone = hvd.allgather_object(result, name=f"bytes.gather.{len(rows)}")   # counter is off here
        if "skipped" in everyone[0]:
            rows.append({**cfg, "skipped": everyone[0]["skipped"]})
        else:
            rows.append({**cfg, "ranks": [r["steps"] for r in everyone]})
        if hvd.rank() == 0:
            print(f"[{len(rows)}/{len(configs)}] {cfg['compressor']} {cfg['mode']} {cfg['transport']} "
                  f"{time.time() - start:.1f} s", flush=True)
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump({"size": hvd.size(), "params": shapes, "rows": rows}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
