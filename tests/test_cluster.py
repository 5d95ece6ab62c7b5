"""Two emulated nodes (scripts/cluster.py: network namespaces with sshd, a 1 Gbit/s tc-limited link between
them), launched as on a real cluster with horovodrun -H hcnode0:2,hcnode1:2 and with mpirun: Horovod sees two
nodes of two local ranks, transport="hierarchical" equals the simulation of 2 nodes x 2 ranks, and the nodes'
links carried the traffic. Runs only as root where network namespaces can be made."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import DISTRIBUTED, ROOT
from test_distributed import check_against_simulation
from scripts import cluster as C

WHY_NOT = C.preflight()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))

CASES = [{"id": "topk DoubleSqueeze", "compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5"},
         {"id": "shared randk EF", "compressor": "randk:0.3,shared", "error_feedback": True},
         {"id": "sign plain, small tensors dense", "compressor": "sign", "dense_below": 16}]
CASES = [{**c, "transport": "hierarchical", "local_size": 2, "steps": 6} for c in CASES]


@pytest.fixture(scope="module")
def two_nodes():
    with C.Cluster(nodes=2, rate_gbit=1.0) as cluster:
        yield cluster
    assert C.our_namespaces() == []


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_hierarchical_across_two_emulated_nodes(two_nodes, tmp_path, launcher):
    (tmp_path / "cases.json").write_text(json.dumps(CASES))
    python = [sys.executable, str(DISTRIBUTED / "worker.py"), str(tmp_path / "cases.json"), str(tmp_path)]
    hosts = two_nodes.hosts(2)
    if launcher == "horovodrun":
        command = [str(ROOT / ".venv" / "bin" / "horovodrun"), "--gloo", "-np", "4", "-H", hosts, *python]
    else:
        command = C.mpirun(hosts, 4, python, ["PYTHONPATH", "OMP_NUM_THREADS", "HOROVOD_DYNAMIC_PROCESS_SETS"])
    env = ["env", f"PYTHONPATH={ROOT}", "OMP_NUM_THREADS=1", "HOROVOD_DYNAMIC_PROCESS_SETS=1"]
    before = two_nodes.sent_bytes()
    proc = subprocess.run(two_nodes.on(0, env + command), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:]
    sent = [b - a for a, b in zip(before, two_nodes.sent_bytes())]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    assert [r["_where"] for r in ranks] == [
        {"host": f"hcnode{r // 2}", "local": (r % 2, 2), "cross": (r // 2, 2)} for r in range(4)]
    for case in CASES:
        check_against_simulation(4, ranks, case)
    assert all(b > 0 for b in sent), sent   # every node's link carried its share
