"""Data-parallel Fashion-MNIST training with stock Horovod and hvd_compress gradient compression.

    horovodrun -np 2 python examples/pytorch_fashion_mnist.py --compressor topk:0.01 --error-feedback

With ``--compressor none`` (no error feedback, no server pass) hvd_compress is not used at all: the run is
Horovod's own dense fp32 allreduce, the baseline the compressed runs are compared with.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import horovod.torch as hvd
from tqdm import tqdm

from hvd_compress.data import load_fashion_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="topk:0.01", help='worker compressor spec, e.g. "topk:0.01", '
                   '"none", "natural", "sign", "topk:0.01+natural"')
    p.add_argument("--error-feedback", action="store_true", help="keep and re-add the compression error")
    p.add_argument("--server", default="", help='compressor spec for the server pass ("" = none)')
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training examples (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="use only the first N test examples (0 = all)")
    p.add_argument("--json", default="", help="rank 0 writes per-epoch records here")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--check-replicas", action="store_true",
                   help="at the end, check that all ranks hold bit-identical parameters")
    return p.parse_args(argv)


def build_model():
    # 28x28 -> conv5 24x24 -> pool 12x12 -> conv5 8x8 -> pool 4x4; 64 channels * 4 * 4 = 1024 features
    return nn.Sequential(
        nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 10))


def load_split(split, limit, device):
    x, y = load_fashion_mnist(split)
    if limit > 0:
        x, y = x[:limit], y[:limit]
    # The whole set fits easily in (GPU) memory; keeping it there avoids a DataLoader per rank.
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.{2 if n < 10 else 1 if n < 100 else 0}f} {unit}"


def train_epoch(model, optimizer, x, y, epoch, args, progress):
    """One epoch on this rank's shard; returns the mean training loss averaged over ranks."""
    model.train()
    # Same permutation on every rank (seeded by seed + epoch), then strided shards of it.
    g = torch.Generator().manual_seed(args.seed + epoch)
    shard = torch.randperm(len(x), generator=g)[hvd.rank()::hvd.size()].to(x.device)
    # Every rank must run the same number of steps or Horovod's collectives hang: size the epoch from
    # the smallest shard and drop the remainder.
    steps = (len(x) // hvd.size()) // args.batch_size
    if steps == 0:
        raise SystemExit(f"too few training examples ({len(x)}) for {hvd.size()} ranks x batch {args.batch_size}")
    total = torch.zeros((), device=x.device)
    bar = tqdm(range(steps), desc=f"epoch {epoch + 1}", disable=not progress, leave=False)
    for i in bar:
        idx = shard[i * args.batch_size:(i + 1) * args.batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += loss.detach()
        if progress and i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return hvd.allreduce(total / steps, op=hvd.Average, name="train_loss").item()


@torch.no_grad()
def evaluate(model, x, y, batch_size=1000):
    """Test accuracy over all ranks: each rank scores its strided shard, then correct/count are summed."""
    model.eval()
    xs, ys = x[hvd.rank()::hvd.size()], y[hvd.rank()::hvd.size()]
    correct = sum((model(xs[i:i + batch_size]).argmax(1) == ys[i:i + batch_size]).sum().item()
                  for i in range(0, len(xs), batch_size))
    counts = hvd.allreduce(torch.tensor([correct, len(xs)], dtype=torch.float64), op=hvd.Sum, name="eval")
    return (counts[0] / counts[1]).item()


def replicas_identical(model):
    """True iff every rank's parameters are bit-identical to every other rank's."""
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
    bits = hvd.allgather(flat.view(torch.int32).unsqueeze(0), name="replica_check")  # size x P
    return all(torch.equal(bits[0], bits[r]) for r in range(1, hvd.size()))


def main():
    args = parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())   # one GPU per rank
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)                  # several ranks share the cores
    rank0 = hvd.rank() == 0

    x_train, y_train = load_split("train", args.train_limit, device)
    x_test, y_test = load_split("test", args.test_limit, device)
    model = build_model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    dense_step = 4 * n_params                     # bytes of one dense fp32 allreduce of all gradients

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    use_hc = not (args.compressor in ("none", "") and not args.error_feedback and not args.server)
    compression = None
    if use_hc:
        import hvd_compress.torch as hc
        compression = hc.Compression(args.compressor or None, error_feedback=args.error_feedback,
                                     server=args.server or None, named_parameters=model.named_parameters())
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=compression)
    else:
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    if rank0:
        print(f"size {hvd.size()}  device {device.type}  compressor {args.compressor or 'none'}  "
              f"error_feedback {args.error_feedback}  server {args.server or 'none'}  "
              f"params {n_params:,}  hvd_compress {'on' if use_hc else 'off (Horovod default)'}", flush=True)

    records, sent_before, dense_before, steps_before = [], 0, 0, 0
    for epoch in range(args.epochs):
        start = time.time()
        loss = train_epoch(model, optimizer, x_train, y_train, epoch, args, rank0 and not args.no_progress)
        acc = evaluate(model, x_test, y_test)
        elapsed = time.time() - start
        if use_hc:  # cumulative counters, so the epoch's share is a difference
            st = compression.stats()
            sent, dense = st["total_bytes_sent"] - sent_before, st["total_dense_bytes"] - dense_before
            sent_before, dense_before = st["total_bytes_sent"], st["total_dense_bytes"]
        else:
            steps = (len(x_train) // hvd.size()) // args.batch_size
            sent = dense = dense_step * steps
            st = {"steps": steps_before + steps}
            steps_before += steps
        ratio = sent / dense if dense else float("nan")
        if rank0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  test_acc {acc:.4f}  "
                  f"bytes_sent {fmt_bytes(sent)}  dense {fmt_bytes(dense)}  ratio {ratio:.4f}  "
                  f"time {elapsed:.1f}s", flush=True)
        records.append(dict(epoch=epoch + 1, loss=loss, test_acc=acc, bytes_sent=sent, dense_bytes=dense,
                            ratio=ratio, time_s=elapsed, last_step_stats=st))

    if rank0 and records:
        total_ratio = sum(r["bytes_sent"] for r in records) / max(1, sum(r["dense_bytes"] for r in records))
        print(f"final test_acc {records[-1]['test_acc']:.4f} ratio {total_ratio:.4f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(config=vars(args), size=hvd.size(), params=n_params, hvd_compress=use_hc,
                               epochs=records), f, indent=2, default=float)
    if args.check_replicas:
        same = replicas_identical(model)   # every rank gets the same answer, so all exit alike
        if rank0:
            print(f"replicas identical: {same}", flush=True)
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
