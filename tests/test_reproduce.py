"""`python -m scripts.reproduce`: every implemented experiment's quick mode end to end (a subprocess, as a user runs
it), then the seeds' claims in its summary.json. (variance and training have their own test files.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts.reproduce"   # run as a module from ROOT


def reproduce(experiment, out, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", SCRIPT, experiment, "--quick", "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def summary_of(experiment, out):
    proc = reproduce(experiment, out)
    assert proc.returncode == 0, proc.stdout[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == experiment and summary["quick"] is True and summary["ok"] is True
    assert all(summary["checks"].values()), summary["checks"]
    for name in summary["figures"].values():
        path = Path(name) if Path(name).is_absolute() else ROOT / name
        assert path.is_file() and path.stat().st_size > 10_000, path
    return summary


def test_divergence_quick(tmp_path):
    s = summary_of("divergence", tmp_path)
    etas = s["setup"]["etas"]
    assert s["setup"]["ranks"] == 3 and len(etas) >= 3
    for eta in etas:
        g = s["growth"][str(eta)]
        expected = 1 + 11 * eta / 6
        assert g["expected"] == pytest.approx(expected, rel=1e-15)
        assert g["max_rel_error"] <= 1e-9
        assert g["measured_min"] == pytest.approx(expected, rel=1e-9)
        assert g["measured_max"] == pytest.approx(expected, rel=1e-9)
        assert g["steps"] >= 20
    for eta in etas:    # error feedback converges (||x_k|| < 1e-6 ||x_0||) at every step size up to 0.1
        if eta <= 0.1:
            assert s["runs"]["ef"][str(eta)]["status"] == "converged", eta
    assert s["runs"]["doublesqueeze"][str(min(etas))]["status"] == "converged"
    assert s["horovod_vs_simulation_max_rel_diff"] <= 1e-9
    # the measured finding of the summary: on the quick grid DoubleSqueeze's stable range is smaller
    assert s["stable_range"]["ef"]["largest_converging_eta"] == 0.1
    assert s["stable_range"]["doublesqueeze"]["largest_converging_eta"] == 0.05
    assert s["doublesqueeze_same_stable_range_as_ef"] is False


def test_classes_quick(tmp_path):
    s = summary_of("classes", tmp_path)
    assert s["violations"] == []
    names = {(r["compressor"], r["d"]) for r in s["compressors"]}
    assert len(names) == len(s["compressors"]) >= 20 * 3
    for r in s["compressors"]:
        assert r["violations"] == [] and r["theory"], r["compressor"]
        if not r["random"]:   # deterministic: exact, so every claimed constant is at least as loose as observed
            for k, t in r["tightness"].items():
                assert t <= 1 + 1e-9, (r["compressor"], r["d"], k, t)
    rules = s["rules"]
    assert all(r["holds"] for r in rules.values() if r["expected_to_hold"])
    assert rules["U->B3 library"]["holds"] and not rules["U->B3 as printed"]["holds"]
    assert not rules["B1->B2 as printed"]["holds"] and rules["B1->B2 derived"]["holds"]


def test_cgd_quick(tmp_path):
    s = summary_of("cgd", tmp_path)
    for problem in ("quadratic", "diabetes"):
        table = s["final_suboptimality"][f"{problem} / 1 node"]
        assert table["Top-5"]["final_suboptimality"] < table["Rand-5"]["final_suboptimality"]
        assert table["Top-5"]["at_bit_budget"] < table["Rand-5"]["at_bit_budget"]
        assert table["Top-5"]["bits_per_iteration"] == table["Rand-5"]["bits_per_iteration"] == 240
        assert table["Top-5"]["final_suboptimality"] < 1e-2
