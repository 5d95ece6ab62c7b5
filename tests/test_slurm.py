"""The sbatch scripts in examples/slurm/, submitted for real to a throw-away Slurm cluster: this machine as one
node, and two nodes of the emulated cluster (scripts/cluster.py).

Runs scripts/slurm_local.py (which needs root; it apt-get installs Slurm + MUNGE if they are missing, starts
munged/slurmctld/slurmd in a temp dir, runs every launch style on 2 ranks per node and tears everything down).
Skipped with a reason where that cannot work: HVD_COMPRESS_SKIP_SLURM=1, not root, no Slurm and no apt-get, or
the cluster could not be started (the script's SETUP-FAILED line). A job that runs and fails a check fails
the test. By default it runs one job per launch style (horovodrun on two nodes, srun and mpirun inside sbatch
on one), across both frameworks; HVD_COMPRESS_SLURM_JOBS=all runs every job, HVD_COMPRESS_SLURM_JOBS=pytorch,keras
a chosen set.
"""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT

ALL_JOBS = ["pytorch", "pytorch-mpirun", "pytorch-srun", "tensorflow", "tensorflow-mpirun", "tensorflow-srun",
            "keras"]
# each launch style once, both frameworks: horovodrun on two nodes (over ssh), srun and mpirun on one
DEFAULT_JOBS = {1: ["pytorch-srun", "tensorflow-mpirun"], 2: ["pytorch"]}
TOTAL_TIMEOUT = 15 * 60
JOB_TIMEOUT = 5 * 60
SETUP_FAILED = 3


def _skip_reason():
    if os.environ.get("HVD_COMPRESS_SKIP_SLURM", "") not in ("", "0"):
        return "HVD_COMPRESS_SKIP_SLURM is set"
    if os.name != "posix" or os.geteuid() != 0:
        return "not root: scripts/slurm_local.py starts munged, slurmctld and slurmd as root"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        return "no .venv (run scripts/setup.sh): the sbatch scripts activate it"
    return None


@pytest.mark.parametrize("nodes", [1, 2], ids=["one node", "two emulated nodes"])
def test_sbatch_scripts_on_local_slurm_cluster(nodes):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    chosen = os.environ.get("HVD_COMPRESS_SLURM_JOBS", ",".join(DEFAULT_JOBS[nodes]))
    jobs = ALL_JOBS if chosen == "all" else [j for j in chosen.split(",") if j]
    cmd = [sys.executable, "-m", "scripts.slurm_local", "--jobs", ",".join(jobs), "--job-timeout", str(JOB_TIMEOUT),
           "--show-output", "--nodes", str(nodes)]
    # env= Python's view of the environment: the C environment of this process may hold an MPI singleton's
    # variables (another test called hvd.init()), which would break mpirun inside the jobs
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=TOTAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)   # the script tears its cluster down on SIGTERM
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"scripts/slurm_local.py ran past {TOTAL_TIMEOUT} s:\n{out[-6000:]}")

    if proc.returncode == SETUP_FAILED:
        why = next((line for line in out.splitlines() if line.startswith("SETUP-FAILED:")), out[-500:])
        pytest.skip(f"local Slurm cluster not available: {why}")
    lines = {m.group(2): m for m in re.finditer(r"^JOB (\S+) (\S+) (\S+) (PASS|FAIL)(.*)$", out, re.M)}
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{out[-8000:]}"
    for job in jobs:
        assert job in lines, f"no JOB line for {job}:\n{out[-4000:]}"
        m = lines[job]
        assert m.group(3) == "COMPLETED" and m.group(4) == "PASS", m.group(0)
        assert "replicas identical: True" in m.group(5), m.group(0)
        assert f"size {2 * nodes}" in m.group(5), m.group(0)
        if nodes == 2:   # the ranks ran on both nodes, and PyTorch's compressed between nodes only
            assert "hcnode0:2,hcnode1:2" in m.group(5) or "hcnode[0-1]" in m.group(5), m.group(0)
