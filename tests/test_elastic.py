"""Elastic Horovod on localhost: horovodrun --host-discovery-script starts 2 ranks (host localhost:2), one is
removed at step 4 (localhost:1), two are added at step 8 (127.0.0.1:2, 3 ranks), and in step 11 rank 0 (the
root) dies mid-step: its host is dropped and the two others go on from the commit of step 10. localhost and
127.0.0.1 are two "hosts" on this machine. tests/distributed/elastic.py trains two
models, each with its own Compression (allgather with momentum correction; sharded), in one
hc.elastic.TorchState. After each resize: training goes on with identical replicas, the step continues, and the
buffers follow the rule of hvd_compress/torch/elastic.py."""
import json
import os
import signal
import subprocess

import pytest
import torch

from conftest import BIN, DISTRIBUTED, ROOT
from hvd_compress import transport as T

STEPS = 12
SCHEDULE = {4: ["localhost:1"], 8: ["localhost:1", "127.0.0.1:2"]}   # after step 4: rank 1 leaves; 8: two join
FAIL = {10: [0, 3]}                                                    # in step 11, rank 0 of 3 dies
SIZES = {0: 2, 4: 1, 8: 3, 10: 2}                                      # the world that starts at each step
SHARDED = 1                                                            # CASES[1] of elastic.py


def run_elastic(tmp_path, timeout=150):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:2\n")
    # --network-interfaces: else horovodrun waits for 2 hosts before it starts (to compare their interfaces);
    # --gloo-timeout-seconds: a dead peer can leave a survivor waiting for a receive until then (default 30)
    cmd = [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "3", "--gloo", "--elastic-timeout",
           "60", "--gloo-timeout-seconds", "10", "--network-interfaces", "lo",
           "--host-discovery-script", str(DISTRIBUTED / "elastic_discovery.sh"),
           str(BIN / "python"), str(DISTRIBUTED / "elastic.py"), str(tmp_path), str(hosts), json.dumps(SCHEDULE),
           json.dumps(FAIL), str(STEPS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HC_ELASTIC_HOSTS=str(hosts))
    # a session of its own, so that a timeout ends horovodrun and every worker it started (never a hang)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # horovodrun's workers (own sessions) end when it dies
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = ""
        pytest.fail(f"elastic job still running after {timeout} s:\n{out[-5000:]}")
    return proc.returncode, out


def equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_elastic_remove_and_add_workers_keeps_replicas_and_follows_the_buffer_rule(tmp_path):
    code, out = run_elastic(tmp_path)
    assert code == 0, out[-5000:]
    assert "DONE rank 0 of 2" in out and "DONE rank 1 of 2" in out, out[-5000:]

    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, STEPS + 1))
    assert [entry["size"] for entry in log] == [2] * 4 + [1] * 4 + [3] * 2 + [2] * 2
    for entry in log:   # training goes on, replicas bit-identical after every step, the step count continues
        assert entry["replicas"] == [{"identical": True, "finite": True}] * 2, entry
        assert entry["steps"] == [entry["step"]] * 2, entry

    load = lambda name: torch.load(tmp_path / name)   # noqa: E731
    for start, m in SIZES.items():
        now = [load(f"start{start}_rank{r}.pt") for r in range(m)]
        assert [s["size"] for s in now] == [m] * m
        assert all(s["replicas"] == [{"identical": True, "finite": True}] * 2 for s in now)
        assert all(c["steps"] == start for s in now for c in s["comps"])
        if start == 0:
            continue
        before = {int(p.name.split("pid")[1][:-3]): torch.load(p) for p in tmp_path.glob(f"commit{start}_pid*.pt")}
        before = sorted(before.items(), key=lambda item: item[1]["rank"])   # the old world, by old rank
        n = len(before)
        assert [c["size"] for _, c in before] == [n] * n and n != m
        for k in range(2):
            # worker buffers: kept by the ranks that stay, zero (none) on the new ones, the departed ones' gone
            for s in now:
                old = dict(before).get(s["pid"])
                for kind in ("worker_error", "velocity"):
                    if old is None:
                        assert s["comps"][k][kind] == {}, (start, k, kind)
                    else:
                        assert equal(s["comps"][k][kind], old["comps"][k][kind]), (start, k, kind)
                        if not (kind == "velocity" and k == SHARDED):   # not vacuous: nonzero buffers kept
                            assert any(t.abs().sum() > 0 for t in s["comps"][k][kind].values()), (start, k, kind)
            # server buffer d: the whole d from the old root to the new root (lost if the root left); slices cut
            # again, the departed ranks' zero
            (root_pid, root), stayed, kept = before[0], {s["pid"] for s in now}, 0.0
            names = sorted(root["comps"][k]["server_error"])
            assert names == ["extra.weight", "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
            for name in names:
                if k != SHARDED:
                    assert all(name not in s["comps"][k]["server_error"] for s in now[1:])
                    if root_pid not in stayed:
                        assert name not in now[0]["comps"][k]["server_error"], (start, name)
                        continue
                    d = root["comps"][k]["server_error"][name]
                    assert torch.equal(now[0]["comps"][k]["server_error"][name], d), (start, name)
                    kept += float(d.abs().sum())
                    continue
                pieces = [c["comps"][k]["server_error"][name] for _, c in before]
                expected = torch.cat([t if pid in stayed else torch.zeros_like(t)
                                      for (pid, _), t in zip(before, pieces)])
                slices = [s["comps"][k]["server_error"][name] for s in now]
                b = T.bounds(expected.numel(), m)
                assert [t.numel() for t in slices] == [b[j + 1] - b[j] for j in range(m)], (start, name)
                assert torch.equal(torch.cat(slices), expected), (start, name)
                kept += float(expected.abs().sum())
            assert kept > 0 or k != SHARDED and root_pid not in stayed, (start, k)   # not vacuous
