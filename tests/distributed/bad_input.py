"""Run under horovodrun with 2 ranks: bad set-ups must end in a clear error on every rank, never a hang.

usage: bad_input.py SCENARIO[,SCENARIO...]   (run one after the other in the same processes, as a user who
                                             caught an error would go on)
  mismatch   rank 1 is configured with another compressor     -> ValueError on both ranks
  nan        rank 1's gradient of fc2.weight is NaN at step 3 -> FloatingPointError on both ranks, buffers kept
             (Compression(nonfinite="raise"); the default skips such a step, see tests/distributed/amp.py)
  nan_dense  the same in fc2.bias, which travels dense (dense_below=16): Horovod averages it, the other
             tensors are compressed                            -> the same, at the end of the step
  op_sum     DistributedOptimizer(op=hvd.Sum)                  -> RuntimeError on both ranks
  k_too_big  TopK(k=10) on a 3-element bias                     -> ValueError on both ranks
  momentum_twice  Compression(momentum=0.9) and SGD(momentum=0.9) -> ValueError on both ranks
  momentum_adam   Compression(momentum=0.9) and AdamW (its first moment would come on top) -> ValueError
  corrected_adam_alone  hc.MomentumCorrectedAdamW without the Compression's momentum -> ValueError
  root_rank  Compression(root_rank=2) with 2 ranks                -> ValueError on both ranks
  SCENARIO_sharded   the same with transport="sharded" (k_too_big: TopK(k=2) > a slice of the 3-element bias)
  SCENARIO_hierarchical  the same with transport="hierarchical" (one node of 2 ranks; needs Horovod's dynamic
             process sets); nodynamic_hierarchical: without them  -> ValueError on both ranks
Every line a scenario prints starts with "<SCENARIO> ". Each rank prints "CAUGHT <type>: <message>" and, for
nan, "BUFFERS_UNCHANGED <bool>". Then, as a user who caught the error would, it trains on with the same
optimizer for 3 steps: it prints "TRAINED_ON <steps done>
<replicas identical>", or "AGAIN <type>: <message>" when the cause persists (the same clear error must come
back, not a Horovod assertion about the step left behind).
"""
import os
import sys

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import LR, TinyNet, loss_of, replica_check  # noqa: E402

import hvd_compress.torch as hc  # noqa: E402


def main(scenarios):
    hvd.init()
    for scenario in scenarios.split(","):
        run(scenario, lambda *words, s=scenario: print(s, *words, flush=True))
        hvd.barrier()


def run(full_name, say):
    model = TinyNet()
    scenario, _, transport = full_name.rpartition("_")
    if transport not in ("sharded", "hierarchical"):
        scenario, transport = full_name, None
    spec = {"mismatch": "topk:0.3" if hvd.rank() == 0 else "randk:0.3",
            "k_too_big": "topk:k=2" if transport else "topk:k=10"}.get(scenario, "topk:0.3")
    compression = hc.Compression(spec, error_feedback=True, server="topk:0.5",
                                 named_parameters=model.named_parameters(), transport=transport,
                                 root_rank=2 if scenario == "root_rank" else 0,
                                 dense_below=16 if scenario == "nan_dense" else 0, nonfinite="raise",
                                 momentum=0.9 if scenario in ("momentum_twice", "momentum_adam") else 0)
    if scenario == "momentum_adam":
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    elif scenario == "corrected_adam_alone":
        optimizer = hc.MomentumCorrectedAdamW(model.parameters(), lr=LR, freeze_after=3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9 if scenario == "momentum_twice" else 0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), compression=compression,
                                         op=hvd.Sum if scenario == "op_sum" else hvd.Average)
    before = None
    try:
        for step in range(6):
            if scenario.startswith("nan") and step == 3:
                before = compression.state_dict()
            optimizer.zero_grad()
            loss = loss_of(model, step, hvd.rank())
            if scenario.startswith("nan") and step == 3 and hvd.rank() == 1:
                poisoned = model.fc2.bias[0] if scenario == "nan_dense" else model.fc2.weight[0, 0]
                loss = loss + poisoned * float("nan")
            loss.backward()
            optimizer.step()
    except Exception as err:   # noqa: BLE001 - the test reads what each rank caught
        say(f"CAUGHT {type(err).__name__}: {err}".replace("\n", " | "))
        hvd.barrier()   # leave together: a rank that exits first shuts Horovod down under the other
        if before is not None:
            after = compression.state_dict()
            unchanged = all(torch.equal(before["worker_error"][r][n], after["worker_error"][r][n])
                            for r in range(hvd.size()) for n in before["worker_error"][r]) and all(
                torch.equal(before["server_error"][n], after["server_error"][n]) for n in before["server_error"])
            say(f"BUFFERS_UNCHANGED {unchanged}")
        train_on(model, optimizer, compression, say)
        return
    say("NO ERROR")


def train_on(model, optimizer, compression, say):
    try:
        for step in range(6, 9):
            optimizer.zero_grad()
            loss_of(model, step, hvd.rank()).backward()
            optimizer.step()
    except Exception as err:   # noqa: BLE001
        say(f"AGAIN {type(err).__name__}: {err}".replace("\n", " | "))
        hvd.barrier()
        return
    say(f"TRAINED_ON {compression.stats()['steps']} {replica_check(model.parameters())['identical']}")


if __name__ == "__main__":
    main(sys.argv[1])
