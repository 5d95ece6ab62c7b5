"""Data-parallel Fashion-MNIST training with stock Horovod and hvd_compress gradient compression.

    horovodrun -np 2 python examples/pytorch_fashion_mnist.py --compressor topk:0.01 --error-feedback

With ``--compressor none`` (no error feedback, no server pass) hvd_compress is not used at all: the run is
Horovod's own dense fp32 allreduce, the baseline the compressed runs are compared with.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import horovod.torch as hvd
from tqdm import tqdm

# Next to this script: `python examples/pytorch_fashion_mnist.py` puts examples/ first on sys.path.
from fmnist_common import (EpochLog, config_line, exit_unless_identical, momentum_split, parse_args,
                           steps_per_epoch, uses_hvd_compress)
from fmnist_data import load_fashion_mnist


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


def train_epoch(model, optimizer, x, y, epoch, steps, args, progress):
    """One epoch of ``steps`` batches on this rank's shard; returns the mean training loss averaged over ranks."""
    model.train()
    # Same permutation on every rank (seeded by seed + epoch), then strided shards of it; the remainder
    # past ``steps`` batches is dropped (see steps_per_epoch).
    g = torch.Generator().manual_seed(args.seed + epoch)
    shard = torch.randperm(len(x), generator=g)[hvd.rank()::hvd.size()].to(x.device)
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
    args = parse_args(__doc__, transport=True)
    # the hierarchical transport adds a process set per node and per local rank at its first step
    hvd.init(process_sets="dynamic" if args.transport == "hierarchical" else None)
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

    use_hc = uses_hvd_compress(args)
    in_optimizer, in_compression = momentum_split(args, use_hc)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, **in_optimizer)
    compression = None
    if use_hc:
        import hvd_compress.torch as hc
        from hvd_compress import fused
        start, cached = time.perf_counter(), fused.library_path().exists()
        loaded = fused.lib() is not None   # compiled here (once per machine) if the set-up did not
        kernels = (f"fused C kernels ({'cached' if cached else 'compiled now'}, ready in "
                   f"{time.perf_counter() - start:.2f} s)" if loaded else "pure-torch kernels (no fused library)")
        compression = hc.Compression(args.compressor or None, error_feedback=args.error_feedback,
                                     server=args.server or None, named_parameters=model.named_parameters(),
                                     transport=args.transport, link_gbps=args.link_gbps,
                                     dense_below=args.dense_below, bucket_mb=args.bucket_mb, **in_compression)
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=compression)
    else:
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    if rank0:
        print(config_line(hvd.size(), device.type, args, n_params, use_hc), flush=True)
        if use_hc:
            print(f"kernels: {kernels}", flush=True)

    steps = steps_per_epoch(len(x_train), hvd.size(), args.batch_size)
    log = EpochLog(lambda: compression.stats() if use_hc else None, dense_step, steps, args.epochs, rank0)
    for epoch in range(args.epochs):
        log.start()
        loss = train_epoch(model, optimizer, x_train, y_train, epoch, steps, args, rank0 and not args.no_progress)
        acc = evaluate(model, x_test, y_test)
        log.end(epoch, loss, acc)
    log.finish(args, hvd.size(), n_params, use_hc)
    if args.check_replicas:
        exit_unless_identical(replicas_identical(model), rank0)


if __name__ == "__main__":
    main()
