"""`python -m scripts.reproduce variance --quick` end to end (a subprocess, as a user runs it), then the first
seed's Fig. 1 claims in its summary.json: biased compressors (deterministic natural, Top-k) have the lower empirical
variance ||C(x) - x||^2 / ||x||^2 on real CNN gradients, within their exact B3 bounds."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reproduce import summary_of  # noqa: E402


def test_variance_quick(tmp_path):
    s = summary_of("variance", tmp_path)
    archs = s["architectures"]
    assert set(archs) == {"ResNet", "VGG", "GoogLeNet"}
    assert set(s["figures"]) == {"whole model", "layer-wise"}
    for arch, a in archs.items():
        assert a["params"] > 10_000 and a["measured_steps"] >= 10, arch
        assert a["test_accuracy"] > 0.3, (arch, a["test_accuracy"])      # it trained (10 classes: chance 0.1)
        for mode in ("whole model", "layer-wise"):
            m = a[mode]
            v = {label: x for label, x in m["variance"].items()}
            assert m["det_below_unbiased_natural_every_step"] and m["topk_below_randk_every_step"], (arch, mode)
            assert m["topk_below_biased_randk_every_step"] and m["topk_within_bound_every_step"], (arch, mode)
            assert v["natural (det.)"]["max"] <= 1 / 9 and v["Top-k"]["max"] <= m["topk_bound_mean"] + 0.01
            assert v["natural (unbiased)"]["mean"] <= 1 / 8
            # the expectations of the random ones: unbiased Rand-k d/k - 1 = 4, biased 1 - k/d = 0.8
            assert v["Rand-k (unbiased)"]["mean"] == pytest.approx(4, rel=0.15), (arch, mode)
            assert v["Rand-k (biased)"]["mean"] == pytest.approx(0.8, rel=0.05), (arch, mode)
            assert m["ratio_randk_to_topk_mean"] > 5 and m["ratio_unbiased_to_det_natural_mean"] > 1.5
