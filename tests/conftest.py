"""Shared helpers: launching real multi-process jobs with horovodrun (Gloo) or mpirun (MPI)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the venv's, else the PATH's (scripts/gpu_check.sh installs Horovod beside a system Python)
HOROVODRUN = str(BIN / "horovodrun") if (BIN / "horovodrun").exists() else shutil.which("horovodrun") or "horovodrun"
DISTRIBUTED = ROOT / "tests" / "distributed"


def launch(np, script, *args, launcher="horovodrun", timeout=300, hosts=None, env=None):
    """Run ``python script args`` on np ranks; returns the CompletedProcess (stdout and stderr merged).
    ``hosts`` (horovodrun -H): e.g. "localhost:2,127.0.0.1:2", two "nodes" on this machine (both addresses
    are local, so no ssh; Horovod gives each its own local ranks)."""
    python = [sys.executable, str(script), *map(str, args)]
    if launcher == "horovodrun":
        cmd = [HOROVODRUN, "-np", str(np), *(["-H", hosts] if hosts else []), "--gloo", *python]
    elif launcher == "mpirun":
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np), *python]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def result_line(proc):
    """The JSON after "RESULT " that rank 0 printed."""
    import json
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])
    raise AssertionError(f"no RESULT line; exit code {proc.returncode}; output:\n{proc.stdout[-5000:]}")


@pytest.fixture(scope="session")
def horovod():
    """Horovod in this process (one rank): for single-process behaviour."""
    import horovod.torch as hvd
    hvd.init()
    return hvd
