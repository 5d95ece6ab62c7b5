"""Run under horovodrun --gloo with 2 ranks: the time of a dense fp32 ``hvd.allreduce`` of d elements (and, for
context, of a memcpy of the same tensor in the same processes), median over repeats.

Each repeat starts after a barrier (a tiny allreduce), so both ranks enter together; a repeat's time is the
slower rank's (the collective is done when both are). Rank 0 writes OUT_JSON: {d: {"allreduce_s", "memcpy_s"}}.
usage: python -m scripts.benchmarks.kernels_worker OUT_JSON REPEATS D [D ...]
"""
import json
import statistics
import sys
import time

import torch
import horovod.torch as hvd


def main(out, repeats, *sizes):
    hvd.init()
    torch.set_num_threads(1)   # as the kernels are timed: one core per rank
    barrier = torch.zeros(1)
    result = {}
    for d in map(int, sizes):
        x, dst = torch.randn(d), torch.empty(d)
        hvd.allreduce(x, name=f"warmup.{d}")
        times, copies = [], []
        for r in range(int(repeats)):
            hvd.allreduce(barrier, name=f"barrier.{d}.{r}")
            start = time.perf_counter()
            hvd.allreduce(x, name=f"dense.{d}.{r}")     # op=Average, fp32: what Horovod does without compression
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            times.append(hvd.allreduce(elapsed, op=hvd.Max, name=f"max.{d}.{r}").item())
            start = time.perf_counter()
            dst.copy_(x)
            copies.append(time.perf_counter() - start)
        result[d] = {"allreduce_s": statistics.median(times), "memcpy_s": statistics.median(copies),
                     "repeats": int(repeats)}
        if hvd.rank() == 0:
            print(f"allreduce d={d}: {result[d]['allreduce_s'] * 1e3:.2f} ms", flush=True)
    if hvd.rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
