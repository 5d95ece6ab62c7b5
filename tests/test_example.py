"""The main job's example, end to end on 2 ranks with a slice of Fashion-MNIST."""
import json

from conftest import ROOT, launch


def test_example_trains_compressed_with_identical_replicas(tmp_path):
    out = tmp_path / "run.json"
    proc = launch(2, ROOT / "examples" / "pytorch_fashion_mnist.py", "--compressor", "topk:0.05",
                  "--error-feedback", "--server", "topk:0.1", "--dense-below", "0", "--epochs", "2",
                  "--train-limit", "3000", "--test-limit", "1000", "--no-progress", "--check-replicas", "--json", out)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "replicas identical: True" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if "epoch 2/2" in line and "test_acc" in line]
    assert lines, proc.stdout[-3000:]
    record = json.loads(out.read_text())
    last = record["epochs"][-1]
    # rank 0 sends TopK 5% (6 bytes per kept element, a 2-byte index and the value: 0.075 of dense fp32) and,
    # as the root, the server's TopK 10% (0.15), plus 5 bytes per tensor per step (step marker, finiteness flag)
    # and the index blocks' counts (4 bytes per further 2^16 elements)
    assert 0.225 <= last["ratio"] < 0.226
    assert last["test_acc"] > 0.5   # ten classes: chance is 0.1
    assert last["last_step_stats"]["steps"] == 2 * (3000 // 2 // 64)


def test_tensorflow_example_with_momentum_correction(tmp_path):
    """The TensorFlow loop with Nesterov's momentum correction without factor masking, the warm-up and local
    clipping: the optimizer's momentum moves into the Compression, and replicas stay identical."""
    out = tmp_path / "run.json"
    proc = launch(2, ROOT / "examples" / "tensorflow_fashion_mnist.py", "--compressor", "topk:0.05",
                  "--error-feedback", "--momentum-correction", "--no-momentum-masking", "--nesterov", "--clip", "5",
                  "--warmup", "10", "--dense-below", "0", "--epochs", "1", "--train-limit", "3000",
                  "--test-limit", "1000", "--no-progress", "--check-replicas", "--json", out)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "replicas identical: True" in proc.stdout
    assert "momentum_correction on (no factor masking)  nesterov  warmup 10 steps" in proc.stdout, proc.stdout[-3000:]
    last = json.loads(out.read_text())["epochs"][-1]
    # TopK 5% costs 0.075 of dense (6 bytes per kept element) plus 5 bytes per tensor and step; the warm-up's
    # first 10 of the 23 steps keep 25% falling to 5%
    assert last["last_step_stats"]["worker_ratio"] == 0.05
    assert 0.09 < last["ratio"] < 0.14
    assert last["test_acc"] > 0.5          # ten classes: chance is 0.1
