"""Keras 3 ``model.fit`` with hvd_compress.keras on 2 ranks (Gloo): the replicas stay bit-identical, the
Compression counts its steps and bytes, and the weights equal those of the tf-keras path (Horovod's own Keras
wrapper, TF_USE_LEGACY_KERAS=1, in its own job) for the same initial weights, data and optimizer. On Keras 3
the ranks other than 0 start from other weights: only the broadcast callback makes the runs equal."""
import numpy as np
import pytest

from conftest import DISTRIBUTED, launch, result_line

CASES = ["topk_ef", "topk_ef_server", "topk_ef_momentum"]


@pytest.fixture(scope="module")
def runs():
    """One 2-rank job per path (each TensorFlow start-up costs seconds): both cases and the refusals."""
    found = {}
    for mode in ("keras3", "tf-keras"):
        proc = launch(2, DISTRIBUTED / "keras3_worker.py", mode)
        assert proc.returncode == 0, proc.stdout[-5000:]
        found[mode] = result_line(proc)
    return found


@pytest.mark.parametrize("case", CASES)
def test_keras3_fit_averages_with_identical_replicas_and_stats(runs, case):
    r = runs["keras3"][case]
    # 2 epochs of 256 samples in batches of 32; TopK 30% uplink costs 0.45 of dense (6 bytes per kept float32:
    # a 2-byte index and the value) plus 4 bytes per tensor; the root adds the server's TopK 50% (0.75)
    assert r["identical"], "the ranks' weights differ"
    assert r["steps"] == 2 * 256 // 32
    assert r["ratio"] == pytest.approx(0.45 + (0.75 if case.endswith("server") else 0.0), abs=0.05)
    assert r["total_bytes_sent"] > 0


@pytest.mark.parametrize("case", CASES)
def test_keras3_fit_equals_the_tf_keras_path(runs, case):
    mine, theirs = runs["keras3"][case], runs["tf-keras"][case]
    assert theirs["identical"] and theirs["steps"] == mine["steps"]
    assert theirs["total_bytes_sent"] == mine["total_bytes_sent"]
    a, b = np.array(mine["weights"]), np.array(theirs["weights"])
    # bit for bit today; 1e-6 of the largest weight leaves room for a different order of float operations
    diff, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    assert diff <= 1e-6 * scale, f"largest difference {diff:.3g}, largest weight {scale:.3g}"


def test_keras3_refusals(runs):
    # hvd_compress.tensorflow.Compression (for Horovod's own Keras wrapper, which never averages on Keras 3)
    # refuses Keras 3 variables and points to hvd_compress.keras; jit_compile=True is refused while tracing
    assert runs["keras3"]["refused"] == {"keras3_variables": True, "xla": True, "momentum_twice": True}, \
        runs["keras3"]["refused"]
    # momentum in the optimizer and in the Compression: refused at the first step on the tf-keras path too
    assert runs["tf-keras"]["refused"] == {"momentum_twice": True}, runs["tf-keras"]["refused"]
