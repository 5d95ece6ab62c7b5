"""Run under horovodrun (1 rank): on which device every tensor handed to Horovod lies, for a few steps of
DoubleSqueeze Top-k with dense small tensors, and whether the result equals the simulation (as RESULT JSON).

usage: gpu_where.py DEVICE
"""
import json
import os
import sys

import torch
import horovod.torch as hvd

sys.path.insert(0, os.path.dirname(__file__))
from common import make_compression, new_model, train_direct, train_reference  # noqa: E402


def main(device):
    hvd.init()
    devices = set()
    for name in ("allgather_async", "allreduce_async", "allreduce_async_", "alltoall_async", "broadcast_async_"):
        original = getattr(hvd, name)

        def recording(tensor, *args, _original=original, **kwargs):
            devices.add(tensor.device.type)
            return _original(tensor, *args, **kwargs)
        setattr(hvd, name, recording)
    results = {}
    for transport in ("allgather", "sharded"):
        case = {"compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5", "device": device,
                "dense_below": 16, "transport": transport, "steps": 4}
        model = new_model(case)
        model, _ = train_direct(case, case["steps"], model, make_compression(case, model))
        expected = train_reference(case, 1, case["steps"])
        results[transport] = all(torch.allclose(p.detach().cpu(), expected[n], rtol=0, atol=1e-9)
                                 for n, p in model.named_parameters())
    print("RESULT " + json.dumps({"nccl_built": bool(hvd.nccl_built()), "cuda_built": bool(hvd.cuda_built()),
                                  "collective_devices": sorted(devices), "equal": all(results.values()),
                                  "by_transport": results}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
