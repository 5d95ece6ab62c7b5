"""One rank of the ``steps`` benchmark (scripts/benchmarks/steps.py starts it inside a network namespace).

Every rank runs, in order and in step with the others:

1. a probe: one dense Horovod allreduce of a tensor of the model's size (the link's achieved throughput);
2. the compute-only step (plain local SGD, no Horovod in the step) with all ranks computing at once;
3. every configuration of the plan, each on a fresh copy of the same model: warm-up steps, then timed steps.

Each timed step starts right after a tiny allreduce (a barrier), so that the ranks start together; the step
time of a step is the slowest rank's, and a configuration's time is the median over its timed steps. Bytes
sent by this rank's interface (``/sys/class/net/IFACE/statistics/tx_bytes`` inside the namespace) are read
around the timed steps (``wire_bytes_by_rank``; steps.py takes the busiest rank's for the ideal step time, see
its docstring), beside the bytes handed to Horovod (``stats()["bytes_sent"]``, or 4 / 2 B per element for
dense / fp16) and, when ``stats()`` has ``"buckets"``, their number. Configuration keys ``transport``,
``dense_below`` and ``bucket_mb`` are handed to ``hc.Compression()`` when set (``PASSTHROUGH``). Rank 0 writes
the report (JSON) after every configuration, so a run cut short still leaves what it measured.

Usage: python -m scripts.benchmarks.steps_worker PLAN_JSON OUT_JSON (from the repository root; the plan is written
by steps.py).
"""
import gc
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import horovod.torch as hvd

import hvd_compress.torch as hc


def make_model(width, layers, seed=0):
    torch.manual_seed(seed)
    modules = []
    for i in range(layers):
        modules.append(nn.Linear(width, width))
        if i < layers - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def tx_bytes(iface):
    try:
        return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())
    except OSError:
        return None


def barrier():
    hvd.allreduce(torch.zeros(1), name="steps.barrier", op=hvd.Sum)


# configuration keys handed to hc.Compression() as keyword arguments when a configuration sets them (not None)
PASSTHROUGH = ("transport", "dense_below", "bucket_mb")


def accepted_keywords():
    """(names hc.Compression() takes, whether it takes **kwargs)."""
    try:
        params = inspect.signature(hc.Compression).parameters
    except (TypeError, ValueError):
        params = inspect.signature(hc.Compression.__init__).parameters
    return params, any(p.kind == p.VAR_KEYWORD for p in params.values())


def make_compression(config, model, rate_bps):
    """(compression object, what was passed) for a configuration; raises TypeError when this version of
    hc.Compression does not accept the configuration's arguments (e.g. transport=, dense_below=, bucket_mb=
    rows before the library has them: the configuration is then skipped with that note)."""
    kind = config["kind"]
    if kind == "dense":
        return hvd.Compression.none, "hvd.Compression.none"
    if kind == "fp16":
        return hvd.Compression.fp16, "hvd.Compression.fp16"
    kwargs = dict(error_feedback=config.get("error_feedback", False), server=config.get("server"))
    params, takes_any = accepted_keywords()
    for key in PASSTHROUGH:
        if config.get(key) is None:
            continue
        if key not in params and not takes_any:
            raise TypeError(f"hc.Compression() does not accept {key}= yet")
        kwargs[key] = config[key]
    if config.get("transport") and config.get("pass_bandwidth"):
        # the link's configured rate (tc's), under the first name Compression accepts
        for name, value in (("link_gbps", rate_bps / 1e9), ("bandwidth", rate_bps), ("link_bps", rate_bps)):
            if name in params:
                kwargs[name] = value
                break
        else:
            raise TypeError("hc.Compression() takes no link bandwidth argument")
    compression = hc.Compression(config["spec"], named_parameters=model.named_parameters(), **kwargs)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None and v is not False)
    return compression, f"hc.Compression({config['spec']!r}{', ' + shown if shown else ''})"


def bucket_count(stats):
    """Number of buckets when stats() reports them (``"buckets"``: one entry per bucket), else None."""
    buckets = stats.get("buckets") if isinstance(stats, dict) else None
    if buckets is None:
        return None
    if isinstance(buckets, int) and not isinstance(buckets, bool):
        return buckets
    try:
        return len(buckets)
    except TypeError:
        return None


class Timed:
    """A Horovod compression object that adds up the time spent in its inner compress() and decompress()
    (compress: encoding, error feedback, starting the payload's collective; decompress: also waiting for it)."""

    def __init__(self, inner):
        self.inner, self.compress_s, self.decompress_s = inner, 0.0, 0.0

    def compress(self, tensor):
        t0 = time.perf_counter()
        result = self.inner.compress(tensor)
        self.compress_s += time.perf_counter() - t0
        return result

    def decompress(self, tensor, ctx):
        t0 = time.perf_counter()
        result = self.inner.decompress(tensor, ctx)
        self.decompress_s += time.perf_counter() - t0
        return result

    def take(self):
        spent = (self.compress_s, self.decompress_s)
        self.compress_s = self.decompress_s = 0.0
        return spent


def timed_steps(step, warmup, steps, iface, timer=None):
    """(step times, tx bytes per step, [(compress s, decompress s)] per step)."""
    for _ in range(warmup):
        barrier()
        step()
    times, spent = [], []
    before = tx_bytes(iface)
    for _ in range(steps):
        barrier()
        if timer:
            timer.take()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if timer:
            spent.append(timer.take())
    after = tx_bytes(iface)
    sent = (after - before) / steps if before is not None and after is not None else None
    return times, sent, spent


def summarize(times_by_rank, sent_by_rank):
    """Per step the slowest rank's time; the median over steps."""
    per_step = [max(ts) for ts in zip(*times_by_rank)]
    sent = [s for s in sent_by_rank if s is not None]
    return {"median_s": statistics.median(per_step), "min_s": min(per_step), "max_s": max(per_step),
            "step_times_s": per_step, "rank_medians_s": [statistics.median(ts) for ts in times_by_rank],
            "wire_bytes_per_rank_step": sum(sent) / len(sent) if sent else None,
            "wire_bytes_by_rank": sent_by_rank}


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    iface = os.environ.get("HOROVOD_GLOO_IFACE", "")
    torch.set_num_threads(1)
    width, layers, batch = plan["width"], plan["layers"], plan["batch"]
    warmup, steps, rate_bps = plan["warmup"], plan["steps"], plan["rate_bps"]
    numel = sum(p.numel() for p in make_model(width, layers).parameters())
    report = {"size": size, "rate_bps": rate_bps, "params": numel, "width": width, "layers": layers,
              "batch": batch, "warmup": warmup, "steps": steps, "torch_threads": torch.get_num_threads(),
              "ifaces": hvd.allgather_object(iface), "configs": {}}

    def write():
        if rank == 0:
            report["loadavg_end"] = os.getloadavg()
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1, default=str))   # stats() may hold non-JSON values
            tmp.replace(out)

    def log(msg):
        if rank == 0:
            print(f"[n={size} {rate_bps / 1e9:g} Gbit/s] {msg}", flush=True)

    # 1. the link: a dense allreduce of a model-sized tensor (first one warms the connections up)
    probe = torch.ones(numel)
    probe_times = []
    before = tx_bytes(iface)
    for _ in range(plan["probe_repeats"] + 1):
        barrier()
        t0 = time.perf_counter()
        hvd.allreduce(probe, name="steps.probe")
        probe_times.append(time.perf_counter() - t0)
    after = tx_bytes(iface)
    probe_times = hvd.allgather_object(probe_times[1:])
    per = [max(ts) for ts in zip(*probe_times)]
    sent = hvd.allgather_object((after - before) / (plan["probe_repeats"] + 1) if before is not None else None)
    ideal = 2 * (size - 1) / size * numel * 4 * 8 / rate_bps
    report["probe"] = {"bytes": numel * 4, "median_s": statistics.median(per), "times_s": per,
                       "ideal_ring_s": ideal, "wire_bytes_by_rank": sent,
                       "algbw_gbit_s": numel * 4 * 8 / statistics.median(per) / 1e9}
    log(f"probe: allreduce of {numel * 4 / 1e6:.1f} MB in {statistics.median(per):.3f} s "
        f"(ring at the rate: {ideal:.3f} s)")
    del probe
    write()

    # 2. compute only: the same step without Horovod, every rank computing at the same time
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1 + rank))
    y = torch.randn(batch, width, generator=torch.Generator().manual_seed(1001 + rank))
    model = make_model(width, layers)
    opt = torch.optim.SGD(model.parameters(), lr=plan["lr"])

    def local_step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    times, _, _ = timed_steps(local_step, warmup, steps, iface)
    report["compute_only"] = summarize(hvd.allgather_object(times), [None])
    log(f"compute only: {report['compute_only']['median_s']:.3f} s")
    del model, opt
    write()

    # 3. the configurations
    for config in plan["configs"]:
        name = config["name"]
        gc.collect()
        model = make_model(width, layers)
        entry = {"config": config}
        try:
            compression, shown = make_compression(config, model, rate_bps)
        except TypeError as err:
            entry.update(skipped=True, note=f"skipped: {err}")
            report["configs"][name] = entry
            log(f"{name}: {entry['note']}")
            write()
            continue
        entry["compression"] = shown
        os.environ.update(config.get("env", {}))   # e.g. HVD_COMPRESS_NODE_MEMORY=0, for this configuration only
        timer = Timed(compression)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=plan["lr"]),
                                       named_parameters=model.named_parameters(), compression=timer)

        def step():
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        try:
            times, sent, spent = timed_steps(step, warmup, steps, iface, timer)
            entry.update(summarize(hvd.allgather_object(times), hvd.allgather_object(sent)))
            spent = hvd.allgather_object(spent)   # per rank, per step: (compress s, decompress s)
            entry["compress_s"] = statistics.median(statistics.median(c for c, _ in ranks) for ranks in spent)
            entry["decompress_s"] = statistics.median(statistics.median(d for _, d in ranks) for ranks in spent)
            if callable(getattr(compression, "stats", None)):   # hc.Compression (Horovod's have no stats())
                stats = compression.stats()
                entry["stats"] = stats
                entry["handed_bytes_per_rank_step"] = stats.get("bytes_sent")
                entry["buckets"] = bucket_count(stats)
            else:   # Horovod allreduces every gradient: 4 (fp32) or 2 (fp16) bytes per element
                entry["handed_bytes_per_rank_step"] = numel * (2 if config["kind"] == "fp16" else 4)
            loss = nn.functional.mse_loss(model(x), y).item()
            entry["final_loss"] = loss if math.isfinite(loss) else str(loss)
            wire = entry["wire_bytes_per_rank_step"]
            log(f"{name}: {entry['median_s']:.3f} s/step (compress() {entry['compress_s']:.3f} s, decompress() "
                f"{entry['decompress_s']:.3f} s), wire {'-' if wire is None else f'{wire / 1e6:.2f}'} MB/rank/step"
                + ("" if entry.get("buckets") is None else f", buckets: {entry['buckets']}"))
        except Exception as err:   # noqa: BLE001 -- recorded; the same error is expected on every rank
            entry.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
            log(f"{name}: FAILED {entry['error']}")
        report["configs"][name] = entry
        for key in config.get("env", {}):
            del os.environ[key]
        del model, opt, compression, timer
        write()
    barrier()
    report["done"] = True
    write()
    log("done")


if __name__ == "__main__":
    main()
