"""What the Fashion-MNIST examples share, framework-free: flags, the start line, the epoch size, the per-epoch
byte accounting, output lines and JSON records, the replica-check exit.

Imported by the scripts next to it (``python examples/X.py`` puts this folder first on ``sys.path``). Nothing
here talks to Horovod: ranks, sizes and the compression's counters are passed in.
"""
import argparse
import json
import sys
import time


def parse_args(description, argv=None, progress_bar="tqdm", transport=False):
    """The examples' flags; ``progress_bar`` only names the bar in ``--no-progress``'s help; ``transport``
    adds --transport, --link-gbps, --dense-below, --momentum-correction, --no-momentum-masking, --nesterov,
    --warmup and --clip ("tensorflow"), and with True also the PyTorch plug-in's --bucket-mb."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressor", default="topk:0.01", help='worker compressor spec, e.g. "topk:0.01", '
                   '"none", "natural", "sign", "topk:0.01+natural", "topk:0.01+bf16"')
    p.add_argument("--error-feedback", action="store_true", help="keep and re-add the compression error")
    p.add_argument("--server", default="", help='compressor spec for the server pass ("" = none)')
    if transport:
        choices = ["allgather", "allreduce", "sharded", "dense", "hierarchical", "auto"]
        p.add_argument("--transport", default=None, choices=choices,
                       help="how payloads travel (default: allreduce if summable, else allgather; hierarchical: "
                            "exact inside a node, compressed between nodes)")
        p.add_argument("--link-gbps", type=float, default=None,
                       help="link bandwidth for --transport auto (default: measured at the first step)")
        p.add_argument("--dense-below", type=int, default=1024,
                       help="tensors with fewer elements travel uncompressed (0: compress all)")
        p.add_argument("--momentum-correction", action="store_true",
                       help="apply --momentum before compressing (Deep Gradient Compression's momentum correction "
                            "and factor masking; needs --error-feedback and a sparsifier); the optimizer then "
                            "runs without momentum")
        p.add_argument("--no-momentum-masking", dest="momentum_masking", action="store_false",
                       help="with --momentum-correction: a sent coordinate keeps its velocity (no factor masking)")
        p.add_argument("--nesterov", action="store_true",
                       help="Nesterov's momentum: in the optimizer, or with --momentum-correction in the Compression")
        p.add_argument("--clip", type=float, default=0.0,
                       help="local gradient clipping: each rank clips each gradient tensor to norm "
                            "CLIP / sqrt(ranks) before compressing (Deep Gradient Compression; 0: none)")
        p.add_argument("--warmup", type=int, default=0,
                       help="steps over which the sparsifier's ratio falls from 25%% to its own (Deep Gradient "
                            "Compression's warm-up; 0: none)")
    if transport is True:
        p.add_argument("--bucket-mb", type=float, default=64,
                       help="dense gradient MiB per bucket of compressed tensors (one collective each)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training examples (0 = all)")
    p.add_argument("--test-limit", type=int, default=0, help="use only the first N test examples (0 = all)")
    p.add_argument("--json", default="", help="rank 0 writes per-epoch records here")
    p.add_argument("--no-progress", action="store_true", help=f"no {progress_bar} progress bar")
    p.add_argument("--check-replicas", action="store_true",
                   help="at the end, check that all ranks hold bit-identical parameters")
    return p.parse_args(argv)


def uses_hvd_compress(args):
    """False for ``--compressor none`` with no error feedback and no server pass: then the run is Horovod's
    own dense fp32 allreduce (the baseline), and hvd_compress is not used at all."""
    return not (args.compressor in ("none", "") and not args.error_feedback and not args.server)


def momentum_split(args, use_hc):
    """Where the momentum goes: (the optimizer's momentum and nesterov, the Compression's momentum correction,
    warm-up and clipping options). With --momentum-correction it moves into the Compression, and the optimizer
    runs without it."""
    correction = use_hc and args.momentum_correction
    return ({"momentum": 0.0 if correction else args.momentum, "nesterov": args.nesterov and not correction},
            {"momentum": args.momentum if correction else 0.0, "clip": args.clip, "warmup": args.warmup,
             "momentum_masking": args.momentum_masking, "nesterov": args.nesterov and correction})


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.{2 if n < 10 else 1 if n < 100 else 0}f} {unit}"


def config_line(size, device, args, n_params, use_hc):
    """The line rank 0 prints before training."""
    return (f"size {size}  device {device}  compressor {args.compressor or 'none'}  "
            f"error_feedback {args.error_feedback}  server {args.server or 'none'}  "
            f"params {n_params:,}  hvd_compress {'on' if use_hc else 'off (Horovod default)'}"
            + (f"  transport {args.transport}" if getattr(args, "transport", None) else "")
            + ("  momentum_correction on" if getattr(args, "momentum_correction", False) else "")
            + ("" if getattr(args, "momentum_masking", True) else " (no factor masking)")
            + ("  nesterov" if getattr(args, "nesterov", False) else "")
            + (f"  warmup {args.warmup} steps" if getattr(args, "warmup", 0) else ""))


def steps_per_epoch(n, size, batch_size):
    """Every rank must run the same number of steps or Horovod's collectives hang: size the epoch from the
    smallest shard and drop the remainder."""
    steps = (n // size) // batch_size
    if steps == 0:
        raise SystemExit(f"too few training examples ({n}) for {size} ranks x batch {batch_size}")
    return steps


class EpochLog:
    """Per-epoch bytes, lines and records.

    ``stats`` returns the compression's cumulative ``stats()`` dict, or None when hvd_compress is off; then
    every step is one dense fp32 allreduce of ``dense_step`` bytes and an epoch is ``steps`` of them. Call
    ``start()`` when an epoch begins and ``end(...)`` once it has been trained and evaluated (on every rank);
    rank 0 prints. ``finish(...)`` prints the final line and writes the ``--json`` file.
    """

    def __init__(self, stats, dense_step, steps, epochs, rank0):
        self.stats, self.dense_step, self.steps, self.epochs, self.rank0 = stats, dense_step, steps, epochs, rank0
        self.records, self.sent_before, self.dense_before, self.steps_before = [], 0, 0, 0
        self.start_time = None

    def start(self):
        self.start_time = time.time()

    def end(self, epoch, loss, acc):
        elapsed = time.time() - self.start_time
        st = self.stats()
        if st is not None:  # cumulative counters, so the epoch's share is a difference
            sent, dense = st["total_bytes_sent"] - self.sent_before, st["total_dense_bytes"] - self.dense_before
            self.sent_before, self.dense_before = st["total_bytes_sent"], st["total_dense_bytes"]
        else:
            sent = dense = self.dense_step * self.steps
            self.steps_before += self.steps
            st = {"steps": self.steps_before}
        ratio = sent / dense if dense else float("nan")
        if self.rank0 and epoch == 0 and st.get("transports"):
            chosen = sorted(set(st["transports"].values()))
            counts = ", ".join(f"{t} {list(st['transports'].values()).count(t)}" for t in chosen)
            link = f" (link {st['link_gbps']:.2f} Gbit/s)" if st.get("link_gbps") else ""
            print(f"transports: {counts} tensors{link}", flush=True)
        if self.rank0:
            print(f"epoch {epoch + 1}/{self.epochs}  loss {loss:.4f}  test_acc {acc:.4f}  "
                  f"bytes_sent {fmt_bytes(sent)}  dense {fmt_bytes(dense)}  ratio {ratio:.4f}  "
                  f"time {elapsed:.1f}s", flush=True)
        self.records.append(dict(epoch=epoch + 1, loss=loss, test_acc=acc, bytes_sent=sent, dense_bytes=dense,
                                 ratio=ratio, time_s=elapsed, last_step_stats=st))

    def finish(self, args, size, n_params, use_hc):
        records = self.records
        if not (self.rank0 and records):
            return
        total_ratio = sum(r["bytes_sent"] for r in records) / max(1, sum(r["dense_bytes"] for r in records))
        print(f"final test_acc {records[-1]['test_acc']:.4f} ratio {total_ratio:.4f}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(config=vars(args), size=size, params=n_params, hvd_compress=use_hc,
                               epochs=records), f, indent=2, default=float)


def exit_unless_identical(same, rank0):
    """The ``--check-replicas`` verdict: rank 0 prints it; every rank got the same answer, so all exit 1 alike
    when the replicas differ."""
    if rank0:
        print(f"replicas identical: {same}", flush=True)
    if not same:
        sys.exit(1)
