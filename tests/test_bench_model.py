"""`python -m scripts.bench model`: the cost model fitted to the committed measurements (results/bench/*.json) runs,
models every measured configuration and keeps the sharded transport's bytes per rank flat in n."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cost_model_fits_and_projects(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scripts.bench", "model", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    s = json.loads((tmp_path / "model.json").read_text())
    assert s["ok"] and all(s["checks"].values())
    assert {p["n"] for p in s["points"]} >= {2, 4}
    for rows in s["projection"].values():
        sharded = rows["DoubleSqueeze Top-k 1% (sharded)"]
        allgather = rows["Top-k 1% + EF (allgather)"]
        assert allgather[-1] > 10 * sharded[-1]      # at 1024 ranks allgather's n payloads dominate
    assert (tmp_path / "model.png").stat().st_size > 10_000
