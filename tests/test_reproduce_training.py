"""`python -m scripts.reproduce training --quick` end to end (a subprocess on 4 real Horovod ranks, as a user runs it),
then the claims in its summary.json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts.reproduce"   # run as a module from ROOT


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("training")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # quick takes about a minute on 2 idle cores; the timeout only guards against a hang on a loaded machine
    proc = subprocess.run([sys.executable, "-m", SCRIPT, "training", "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["experiment"] == "training" and s["quick"] is True and s["ok"] is True
    for name in s["figures"].values():
        path = Path(name) if Path(name).is_absolute() else ROOT / name
        assert path.is_file() and path.stat().st_size > 10_000, path
    return s


def test_checks_pass(summary):
    assert all(summary["checks"].values()), summary["checks"]
    assert set(summary["figures"]) == {"all", "doublesqueeze", "fig3", "momentum", "adamw", "epoch_time"}


def test_every_configuration_trains_on_4_identical_replicas(summary):
    table, setup = summary["table"], summary["setup"]
    assert setup["ranks"] == 4 and len(table) == 24   # the seeds' 10, SGD with momentum 8, AdamW on a ViT 6
    for label, row in table.items():
        assert row["epochs_done"] == setup["epochs"] and row["failed"] is None, label
        assert row["replicas_identical"] is True, label
        assert row["final_test_acc"] > 0.3, label       # chance is 0.1
        records = summary["runs"][label]
        assert [r["epoch"] for r in records] == list(range(1, setup["epochs"] + 1))
        assert all(a["bytes_sent"] < b["bytes_sent"] for a, b in zip(records, records[1:])), label


def test_error_feedback_beats_topk_without_it(summary):
    table = summary["table"]
    ef, plain = table["MEM-SGD: Top-k 1% + EF"], table["Top-k 1% (no EF)"]
    assert ef["final_test_acc"] > plain["final_test_acc"]
    assert ef["final_train_loss"] < plain["final_train_loss"]


def test_bytes_on_the_wire(summary):
    ratio = {label: row["bytes_ratio"] for label, row in summary["table"].items()}
    assert ratio["none (dense fp32)"] == 1.0
    assert 0.015 <= ratio["Top-k 1% (no EF)"] < 0.0225                    # k 2-byte indices + k fp32 values
    assert ratio["MEM-SGD: Top-k 1% + EF"] == ratio["Top-k 1% (no EF)"]   # error feedback sends nothing more
    assert ratio["DoubleSqueeze Top-k 1%"] == pytest.approx(2 * ratio["Top-k 1% (no EF)"], rel=0.05)  # + server
    assert ratio["Rand-k 5% (unbiased)"] == ratio["Top-k 5% + EF"]         # same wire format
    assert 0.075 <= ratio["Top-k 5% + EF"] < 0.0825
    assert 0.0375 <= ratio["Top-k 5% + natural + EF"] < 0.045             # 2-byte index + 1-byte value
    assert 0.25 <= ratio["natural (unbiased)"] < 0.26                     # 1 byte per element
    assert 0.25 <= ratio["QSGD 16 levels"] < 0.26                         # int8 level per element
    assert 2 / 32 <= ratio["DoubleSqueeze 1-bit"] < 0.07                  # 1 bit up, 1 bit down on the root
    for label, row in summary["table"].items():
        if summary["setup"]["configs"][label]["warmup"]:   # the ratio starts at 25%, or the first steps are dense
            assert row["bytes_over_wire_format"] > 1.2, label
        else:   # the payloads and hvd_compress's 5 control bytes per compressed tensor and step, exactly
            assert row["bytes_sent"] == row["payload_bytes_by_wire_format"], label
    assert ratio["SGD-m: Top-k 1% + EF"] == ratio["Top-k 1% (no EF)"]   # momentum in the optimizer: same bytes
    # what is compressed changes, not how much: the same schedule of ratios, the same bytes
    assert (ratio["SGD-m: Top-k 1% + EF + DGC recipe without factor masking"]
            == ratio["SGD-m: Top-k 1% + EF + DGC recipe without factor masking, Nesterov"]
            == ratio["SGD-m: Top-k 1% + EF + DGC recipe"])
    assert (ratio["AdamW ViT: Top-k 1% of the first moment + EF, 1% dense then v frozen"]
            == ratio["AdamW ViT: Top-k 1% + EF, 1% dense then v frozen"])


def test_findings_are_recorded(summary):
    assert set(summary["findings"]) >= {"doublesqueeze_vs_compressed_sgd", "topk_vs_randk", "fig3_same_bytes",
                                        "topk_natural_efficiency", "per_epoch_time", "sgd_momentum", "sgd_nesterov",
                                        "adamw"}
    assert summary["finding"]
