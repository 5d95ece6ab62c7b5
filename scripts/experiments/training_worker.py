"""Run under mpirun with 4 ranks: every configuration of experiment `training`, interleaved step by step.

Each configuration trains the same CNN from the same initial weights (seeded) on Fashion-MNIST with stock
``hvd.DistributedOptimizer`` (SGD): Horovod's own dense allreduce for "none", otherwise
``hvd_compress.torch.Compression(compressor, error_feedback, server)``. Every configuration sees the same
data in the same order: each epoch one permutation seeded by (seed, epoch), strided shards per rank, the
remainder dropped so that every rank runs the same steps. The configurations take turns step by step on the
same batch, each step timed on its own.

Per epoch (rank 0 records, every metric averaged or summed over all ranks): mean training loss of the
epoch's minibatches, test loss and accuracy, bytes rank 0 handed to collectives (hvd_compress's
``total_bytes_sent``; 4 bytes per parameter per step for "none", Horovod's fp32 allreduce), and the
wall time of the epoch's training steps (forward, backward, compression, collectives, update). At the end:
whether the 4 replicas are bit-identical.

usage: python -m scripts.experiments.training_worker CONFIG_JSON OUT_JSON
CONFIG_JSON: {"configs": {label: spec}, "epochs", "batch_size", "seed", "train_limit", "test_limit", "width",
"vit_dim"}; a spec names compressor, error_feedback, server, optimizer ("sgd", "adamw", or "adamw-frozen-v" /
"adamw-momentum": hvd_compress's FrozenVarianceAdamW / MomentumCorrectedAdamW, frozen when the warm-up ends), lr,
momentum (with momentum correction and "adamw-momentum": Adam's beta1),
weight_decay, model ("cnn" or "vit"), and the Compression's momentum (correction), warmup, clip and dense_below
(and momentum_masking, True when absent, and nesterov, False when absent: in the Compression with momentum
correction, else in the optimizer).
"""
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import horovod.torch as hvd

import hvd_compress.torch as hc

from examples.fmnist_data import load_fashion_mnist


def build_model(width):
    """A LeNet-like CNN; ``width`` scales the channels (28 -> conv5 24 -> pool 12 -> conv5 8 -> pool 4)."""
    c1, c2, hidden = width, 2 * width, 8 * width
    return nn.Sequential(
        nn.Conv2d(1, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * c2, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class TinyViT(nn.Module):
    """A small vision transformer: 7x7 patches (16 tokens) and a class token, ``depth`` pre-norm blocks."""

    def __init__(self, dim, depth=2, heads=4, patch=7):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (28 // patch) ** 2, dim))
        block = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        p = self.patch
        tokens = self.embed(x.unfold(2, p, p).unfold(3, p, p).reshape(len(x), -1, p * p))
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos
        return self.head(self.norm(self.blocks(tokens)[:, 0]))


def load_split(split, limit):
    x, y = load_fashion_mnist(split)
    return torch.from_numpy(x[:limit]), torch.from_numpy(y[:limit])


@torch.no_grad()
def evaluate(model, x, y, batch_size=1000):
    """(mean loss, accuracy) over the whole set: each rank scores its strided shard, sums are allreduced."""
    model.eval()
    xs, ys = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]
    loss = correct = 0.0
    for i in range(0, len(xs), batch_size):
        out = model(xs[i:i + batch_size])
        loss += F.cross_entropy(out, ys[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == ys[i:i + batch_size]).sum().item()
    sums = hvd.allreduce(torch.tensor([loss, correct, len(xs)], dtype=torch.float64), op=hvd.Sum, name="eval")
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def replicas_identical(model):
    """True iff every rank's parameters are bit-identical to every other rank's."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    bits = hvd.allgather(flat.view(torch.int32).unsqueeze(0), name="replica_check")
    return all(torch.equal(bits[0], bits[r]) for r in range(1, hvd.size()))


def build(j, spec, cfg, total_steps):
    """Configuration j: its model (the same initial weights for all of a kind), optimizer and Compression (or
    None for Horovod's own dense allreduce). A warm-up given as a fraction is that part of the run's steps (at
    least 5: the quick run is short, and a second moment learnt from fewer steps is noise)."""
    warmup = spec["warmup"]
    if isinstance(warmup, list) and isinstance(warmup[0], float):
        warmup = [max(5, round(warmup[0] * total_steps)), warmup[1]]
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["width"]) if spec["model"] == "cnn" else TinyViT(cfg["vit_dim"])
    # names unique per configuration, so that Horovod's collectives of different configurations never share
    # a name (and its response cache) while the configurations are interleaved
    named = [(f"c{j}.{n}", p) for n, p in model.named_parameters()]
    correction = spec["momentum_correction"]   # the momentum moves from the optimizer into the Compression
    if spec["optimizer"] == "sgd":
        momentum = 0.0 if correction else spec["momentum"]
        optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=momentum,
                                    nesterov=spec.get("nesterov", False) and not correction)
    elif spec["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    else:   # 1-bit Adam's recipe: the second moment frozen when the dense warm-up ends
        frozen = {"adamw-frozen-v": hc.FrozenVarianceAdamW, "adamw-momentum": hc.MomentumCorrectedAdamW}
        optimizer = frozen[spec["optimizer"]](model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"],
                                              freeze_after=warmup[0])
    compression = None
    if spec["compressor"] == "none" and not spec["error_feedback"] and not spec["server"]:
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=named)
    else:
        compression = hc.Compression(spec["compressor"], error_feedback=spec["error_feedback"],
                                     server=spec["server"], named_parameters=named, seed=cfg["seed"],
                                     dense_below=spec["dense_below"], warmup=warmup, clip=spec["clip"],
                                     momentum=spec["momentum"] if correction else 0.0,
                                     momentum_masking=spec.get("momentum_masking", True),
                                     nesterov=spec.get("nesterov", False), transport=spec.get("transport"))
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=named, compression=compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return {"model": model, "optimizer": optimizer, "compression": compression, "records": [], "failed": None,
            "params": sum(p.numel() for p in model.parameters()),
            "param_sizes": {n: p.numel() for n, p in model.named_parameters()}}


def step(run, x, y):
    run["optimizer"].zero_grad()
    loss = F.cross_entropy(run["model"](x), y)
    loss.backward()
    run["optimizer"].step()
    return loss.item()


def main(config_path, out_path):
    hvd.init()
    torch.set_num_threads(1)                     # several ranks share the cores
    cfg = json.loads(open(config_path).read())
    x_train, y_train = load_split("train", cfg["train_limit"])
    x_test, y_test = load_split("test", cfg["test_limit"])
    bs, size = cfg["batch_size"], hvd.size()
    steps = len(x_train) // size // bs
    runs = {label: build(j, spec, cfg, steps * cfg["epochs"]) for j, (label, spec) in enumerate(cfg["configs"].items())}
    for epoch in range(cfg["epochs"]):
        g = torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)
        shard = torch.randperm(len(x_train), generator=g)[hvd.rank()::size]
        active = [r for r in runs.values() if not r["failed"]]
        for r in active:
            r["model"].train()
            r["loss"] = r["time"] = 0.0
        # The configurations take turns step by step on the same batch: the same data order for all, and
        # load from other jobs on the machine falls on every configuration's timing alike.
        for i in range(steps):
            idx = shard[i * bs:(i + 1) * bs]
            for r in active:
                if r["failed"]:
                    continue
                start = time.perf_counter()
                try:
                    r["loss"] += step(r, x_train[idx], y_train[idx])
                except FloatingPointError as err:   # hvd_compress raises it on every rank alike
                    r["failed"] = str(err)
                r["time"] += time.perf_counter() - start
        for label, r in runs.items():
            if r not in active:
                continue
            train_loss = hvd.allreduce(torch.tensor(r["loss"] / steps), op=hvd.Average, name="train_loss").item()
            test_loss, test_acc = evaluate(r["model"], x_test, y_test)
            done = steps * (epoch + 1)
            c = r["compression"]
            sent = c.stats()["total_bytes_sent"] if c else 4 * r["params"] * done
            r["records"].append(dict(epoch=epoch + 1, train_loss=train_loss, test_loss=test_loss,
                                     test_acc=test_acc, bytes_sent=sent, dense_bytes=4 * r["params"] * done,
                                     time_s=r["time"]))
            if not math.isfinite(train_loss) and not r["failed"]:
                r["failed"] = f"training loss {train_loss} in epoch {epoch + 1}"
            if hvd.rank() == 0:
                print(f"{label}: epoch {epoch + 1} train_loss {train_loss:.4f} test_acc {test_acc:.4f} "
                      f"time {r['time']:.1f}s done", flush=True)
    report = {"size": size, "runs": {
        label: {"records": r["records"], "replicas_identical": replicas_identical(r["model"]),
                "failed": r["failed"], "params": r["params"], "steps_per_epoch": steps,
                "param_sizes": r["param_sizes"]} for label, r in runs.items()}}
    if hvd.rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
