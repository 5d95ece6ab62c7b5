"""`python -m scripts.bench`: the quick modes of `bytes` and `kernels` end to end (a subprocess, as a user runs
them), then their exact claims. Timings are never asserted (the machine is shared); only that every timing exists."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from hvd_compress import compressors as C
from scripts.benchmarks import floor

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts.bench"   # run as a module from ROOT


def bench(name, out, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", SCRIPT, name, "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert (out / f"{name}.json").is_file(), proc.stdout[-5000:]
    summary = json.loads((out / f"{name}.json").read_text())
    assert summary["benchmark"] == name and summary["quick"] is True
    return proc, summary


def test_bytes_quick(tmp_path):
    proc, s = bench("bytes", tmp_path)
    rows = s["rows"]
    dense = s["setup"]["dense_bytes"]
    assert dense == 4 * s["setup"]["parameters"] and s["setup"]["parameters"] > 500_000
    assert s["setup"]["ranks"] == [2]
    for r in rows:
        what = (r["compressor"], r["mode"], r["transport"], r["which"])
        assert r["steps_identical"], what
        # counted from the tensors handed to Horovod == what Compression.stats() reports
        if r["compressor"] != "dense":
            assert r["counted"] == r["stats"], what
        # == the payload formula (within 1%; the formula is exact, so in fact equal), or within its upper bound
        # where the data decide (sharded without a server: the exact average travels as its nonzeros)
        if r["formula"] is not None and r["formula_kind"] == "exact":
            assert abs(r["counted"] - r["formula"]) <= 0.01 * r["formula"], what
            assert r["counted"] == r["formula"], what
        elif r["formula"] is not None:
            assert r["formula_kind"] == "upper bound" and r["transport"] == "sharded" and r["mode"] != "doublesqueeze"
            assert r["counted"] <= r["formula"], what
        assert r["ratio_to_dense"] == r["counted"] / dense
    # every compressor x mode ran on its built-in transport, with a formula
    for spec in s["setup"]["compressors"]:
        for mode in s["setup"]["modes"]:
            builtin = "allreduce" if C.parse(spec).summable else "allgather"
            assert any(r["compressor"] == spec and r["mode"] == mode and r["transport"] == builtin
                       and r["formula_kind"] == "exact" for r in rows), (spec, mode)
    assert [r["counted"] for r in rows if r["compressor"] == "dense"] == [dense]
    # DoubleSqueeze on the built-in transport: the root also sends the server payload, the others do not
    ds = [r for r in rows if r["compressor"] == "topk:0.01" and r["mode"] == "doublesqueeze"
          and r["transport"] == "allgather"]
    assert {r["which"] for r in ds} == {"rank 0 (root)", "rank 1"}
    root, other = sorted(ds, key=lambda r: r["which"] != "rank 0 (root)")
    assert root["counted"] > other["counted"] and "server payload (root's broadcast)" in root["terms"]
    for label, t in s["targets"].items():   # bytes are deterministic: the issue's ratios are exact claims here
        assert t["met"], (label, t)
    assert all(s["checks"].values()), s["checks"]
    assert proc.returncode == 0 and s["ok"] is True, proc.stdout[-3000:]


def test_kernels_quick(tmp_path):
    proc, s = bench("kernels", tmp_path)
    assert proc.returncode == 0 and s["ok"] is True, proc.stdout[-5000:]
    setup = s["setup"]
    assert setup["frameworks"] == ["torch", "tf"] and len(setup["compressors"]) >= 3
    assert setup["threads"]["torch"] == 1
    seen = {(r["framework"], r["compressor"], r["d"]) for r in s["rows"]}
    assert seen == {(fw, c, d) for fw in setup["frameworks"] for c in setup["compressors"] for d in setup["sizes"]}
    for r in s["rows"]:
        for key in ("encode_s", "decode_s", "total_s", "throughput_gbps", "fraction_of_memcpy", "vs_allreduce"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["throughput_gbps"] == 4 * r["d"] / r["total_s"] / 1e9
    for d in setup["sizes"]:
        for key in ("memcpy_s", "clone_s", "memcpy_gbps"):
            value = s["memcpy"][str(d)][key]
            assert math.isfinite(value) and value > 0, (d, key)
        assert math.isfinite(s["allreduce"][str(d)]["allreduce_s"]) and s["allreduce"][str(d)]["allreduce_s"] > 0
    assert s["targets"] and all(isinstance(t["all_met"], bool) for t in s["targets"].values())
    # the worker step with error feedback + the decode of 2 payloads, as a multiple of memcpy time
    step = s["step"]
    largest = max(setup["sizes"])
    by_key = {}
    for r in step["rows"]:
        by_key.setdefault((r["framework"], r["compressor"], r["d"]), set()).add(r["path"])
        for key in ("step_s", "decode_s", "total_s", "x_memcpy"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["x_memcpy"] == r["total_s"] / step["memcpy"][str(r["d"])]["memcpy_s"]
        assert r["path"] != "eager" or r["d"] == largest
        assert r["path"] != "tf.function" or r["xla_refused"]   # plain TF only where XLA refused, with why
    for spec in step["setup"]["compressors"]:
        for d in setup["sizes"]:
            assert "fused" in by_key[("torch", spec, d)], (spec, d)
        assert "eager" in by_key[("torch", spec, largest)], spec
    for spec in step["setup"]["tf_compressors"]:
        for d in setup["sizes"]:
            assert len(by_key[("tf", spec, d)] & {"xla", "tf.function"}) == 1, (spec, d)
    assert any(C.parse(spec).summable for spec in step["setup"]["compressors"])   # both decode paths ran
    if floor.library() is not None:   # the memory floor of each payload layout, timed beside the kernels
        assert {r["compressor"] for r in step["rows"] if r["framework"] == "floor"} == set(floor.LAYOUTS)
    assert step["targets"] and all(isinstance(t["all_met"], bool) and t["d"] == largest
                                   and all(isinstance(m, bool) for m in t["met"].values())
                                   for t in step["targets"].values())
    figure = ROOT / s["figures"]["throughput"] if not Path(s["figures"]["throughput"]).is_absolute() \
        else Path(s["figures"]["throughput"])
    assert figure.is_file() and figure.stat().st_size > 10_000
