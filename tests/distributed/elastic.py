"""Run by horovodrun in elastic mode (tests/test_elastic.py): two TinyNets, each with its own optimizer and
Compression (allgather with momentum correction; sharded), in one ``hc.elastic.TorchState``, committed every
step. At the scheduled steps rank 0 rewrites the hosts file that the discovery script prints and waits for
Horovod's notice before committing, so that every resize happens at a known commit. At the step of FAIL_JSON
({"step": [rank, size]}) that rank of a world of that size dies in the middle of the step (after the first
model's update, before the second's): the others get HorovodInternalError, restore the last commit, and
Horovod drops the failed host.

Written to DIR (the test checks them):
  commit{step}_pid{pid}.pt  the buffers process pid committed at that step (with its rank and the size)
  start{step}_rank{r}.pt    what rank r holds when training (re)starts in a world at that step, after the sync
  log.jsonl                 rank 0, a line per step: size, replicas identical and finite, each Compression's steps
usage: elastic.py DIR HOSTS_FILE SCHEDULE_JSON ({"step": ["host:slots", ...]}) FAIL_JSON STEPS
"""
import json
import os
import sys
import time

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import LR, TinyNet, loss_of, make_compression, replica_check  # noqa: E402
import hvd_compress.torch as hc  # noqa: E402

CASES = [{"compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.1", "momentum": 0.5},
         {"compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.1", "transport": "sharded"}]


def buffers(comp):
    return {"worker_error": dict(comp._worker_error), "velocity": dict(comp._velocity),
            "server_error": dict(comp._server_error), "steps": comp.stats()["steps"]}


def main(directory, hosts_file, schedule, fail, steps):
    hvd.init()
    torch.set_num_threads(1)
    schedule, steps = {int(k): v for k, v in json.loads(schedule).items()}, int(steps)
    fail = {int(k): v for k, v in json.loads(fail).items()}
    models = [TinyNet() for _ in CASES]
    comps = [make_compression(case, model) for case, model in zip(CASES, models)]
    optimizers = [hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                           named_parameters=model.named_parameters(), compression=comp)
                  for model, comp in zip(models, comps)]
    state = hc.elastic.TorchState(model=models[0], optimizer=optimizers[0], model1=models[1],
                                  optimizer1=optimizers[1], comp0=comps[0], comp1=comps[1], step=0)

    def save(what, name):
        torch.save(what, os.path.join(directory, name + ".tmp"))
        os.replace(os.path.join(directory, name + ".tmp"), os.path.join(directory, name))

    @hvd.elastic.run
    def train(state):
        save({"pid": os.getpid(), "rank": hvd.rank(), "size": hvd.size(), "comps": [buffers(c) for c in comps],
              "replicas": [replica_check(m.parameters(), name=f"start.{i}") for i, m in enumerate(models)]},
             f"start{state.step}_rank{hvd.rank()}.pt")
        while state.step < steps:
            for model, optimizer in zip(models, optimizers):
                if model is models[1] and fail.get(state.step) == [hvd.rank(), hvd.size()]:
                    os._exit(1)   # a worker lost mid-step: the first model has moved on, uncommitted
                optimizer.zero_grad()
                loss_of(model, state.step, hvd.rank()).backward()
                optimizer.step()
            checks = [replica_check(m.parameters(), name=f"replicas.{i}") for i, m in enumerate(models)]
            state.step += 1
            if hvd.rank() == 0:
                with open(os.path.join(directory, "log.jsonl"), "a") as log:
                    log.write(json.dumps({"step": state.step, "size": hvd.size(), "replicas": checks,
                                          "steps": [c.stats()["steps"] for c in comps]}) + "\n")
            save({"rank": hvd.rank(), "size": hvd.size(), "comps": [buffers(c) for c in comps]},
                 f"commit{state.step}_pid{os.getpid()}.pt")
            if hvd.rank() == 0 and state.step in schedule:
                with open(hosts_file + ".tmp", "w") as f:
                    f.write("\n".join(schedule[state.step]) + "\n")
                os.replace(hosts_file + ".tmp", hosts_file)
                deadline = time.time() + 60
                while state._host_messages.empty():   # as Horovod's own elastic tests wait
                    if time.time() > deadline:
                        raise TimeoutError("no notice of the host change from Horovod's driver")
                    time.sleep(0.1)
            state.commit()

    train(state)
    print(f"DONE rank {hvd.rank()} of {hvd.size()}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
