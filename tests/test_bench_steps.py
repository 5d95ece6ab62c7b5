"""`python -m scripts.bench steps --quick` runs end to end: ranks in network namespaces over tc-limited veths.

Needs root (CAP_NET_ADMIN) and iproute2; skipped otherwise. No timing thresholds: it checks that every
configuration of the quick plan was measured with a finite positive step time, that every row carries a finite
positive efficiency against the ideal (compute only + wire bytes / link rate) and speed-ups against dense and
the best of dense/fp16, that compute-only is its own row with efficiency 1, that the traffic crossed the shaped
links, and that the benchmark removed its namespaces.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # for `import scripts`; `python -m pytest` from ROOT has it there already
from scripts.benchmarks.steps import preflight  # noqa: E402   (why the network cannot be built here, or None)


def namespaces():
    out = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()]


def test_steps_quick(tmp_path):
    why = preflight()
    if why:
        pytest.skip(why)
    proc = subprocess.run([sys.executable, "-m", "scripts.bench", "steps", "--quick", "--out",
                           str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    output = proc.stdout[-6000:]
    left = [ns for ns in namespaces() if ns.startswith("hcns")]
    assert not left, f"namespaces left behind: {left}\n{output}"
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "steps.json").read_text())
    assert summary["ok"] and summary["checks"] and all(summary["checks"].values()), summary["checks"]
    from scripts.benchmarks.steps import COMPUTE_ONLY, PLANS
    plan = PLANS[True]
    assert len(summary["tables"]) == len(plan["sizes"]) * len(plan["rates_gbit"]), output
    for table in summary["tables"]:
        rows = {row["config"]: row for row in table["rows"]}
        assert sorted(rows) == sorted(plan["configs"] + [COMPUTE_ONLY]), rows
        finite = lambda v: isinstance(v, float) and math.isfinite(v) and v > 0   # noqa: E731
        for name, row in rows.items():
            t = row["median_s"]
            assert finite(t), (name, row, output)
            for key in ("speedup", "vs_best", "ideal_s", "efficiency", "efficiency_handed"):
                assert finite(row[key]), (name, key, row, output)
            if row["kind"] == "config":
                assert row["wire_bytes"] and row["wire_bytes"] > 0, (name, row)
                assert row["efficiency_basis"] == "wire", (name, row)   # the quick run has the tx counters
                assert row["ideal_s"] > table["compute_only_s"], (name, row)
        compute = rows[COMPUTE_ONLY]
        assert compute["kind"] == "compute_only" and compute["efficiency"] == 1.0, compute
        assert compute["median_s"] == table["compute_only_s"] == compute["ideal_s"]
        assert rows["dense"]["speedup"] == 1.0
        assert rows[rows["dense"]["best_baseline"]]["vs_best"] == 1.0   # the best baseline against itself
        assert math.isfinite(table["compute_only_s"]) and table["compute_only_s"] > 0
    assert (tmp_path / "steps.png").exists()
