"""The TensorFlow plug-in on real multi-process runs (2 ranks with horovodrun/Gloo, 3 with mpirun): every
compressor x mode x transport (see CASES_2 and CASES_3 for what runs by default) equals the single-process
simulation and replicas are bit-identical, the seed's
counterexample, checkpoint/resume, Keras (tf-keras) fit, bad set-ups and steps skipped for a non-finite
gradient."""
import json
import os
import pickle
import sys

import numpy as np
import pytest

from conftest import DISTRIBUTED, launch, result_line
from test_distributed import cases_of_every_compressor_and_mode

sys.path.insert(0, str(DISTRIBUTED))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

STEPS = 12


# A variable whose gradient is None on odd steps (the head "extra") for three compressors (sparse payloads, the
# allreduce of shared Rand-k, random codes), also sharded; the others use it on every step, so that their step
# function is traced once (tracing is most of this file's time).
NONE_GRADIENT_CASES = ("topk:0.3/", "randk:0.3,shared/", "natural/")
CASES = [c if c["id"].startswith(NONE_GRADIENT_CASES) else {**c, "extra_every_step": True}
         for c in cases_of_every_compressor_and_mode(STEPS)]
# sharded compresses slice by slice: a fixed k= larger than a slice is refused (tested with bad input)
SHARDED = [{**c, "id": c["id"] + "/sharded", "transport": "sharded"} for c in CASES if "k=" not in c["compressor"]]
DS = {"compressor": "topk:0.3", "error_feedback": True, "server": "topk:0.5", "steps": STEPS, "extra_every_step": True}
TRANSPORTS = [
    {**DS, "id": "transport=dense", "transport": "dense"},
    {**DS, "id": "transport=allgather/randk:0.3,shared", "compressor": "randk:0.3,shared", "transport": "allgather"},
    # a link slow enough that the larger variables are compressed and the smallest stay dense (the model mixes
    # from 2e-4 to 5e-4 Gbit/s on 2 and 3 ranks)
    {**DS, "id": "transport=auto", "transport": "auto", "link_gbps": 3e-4},
    {**DS, "id": "dense_below=16", "dense_below": 16},
    {**DS, "id": "dense_below=16/sharded", "dense_below": 16, "transport": "sharded"},
]
# Deep Gradient Compression's options: momentum correction (with and without factor masking, Nesterov's form),
# the velocity of the variables left dense too, and local clipping to 4 / sqrt(n) (gradient norms here are 1-5)
MOMENTUM = [
    {**DS, "id": "momentum=0.9", "momentum": 0.9},
    {**DS, "id": "momentum=0.9/sharded", "momentum": 0.9, "transport": "sharded"},
    {**DS, "id": "momentum=0.5/randk:0.3/no server", "momentum": 0.5, "compressor": "randk:0.3", "server": None},
    {**DS, "id": "momentum=0.9/nesterov/no masking/dense_below=16", "momentum": 0.9, "nesterov": True,
     "momentum_masking": False, "dense_below": 16},
    {**DS, "id": "momentum=0.9/no masking/sign", "momentum": 0.9, "momentum_masking": False, "compressor": "sign"},
    {**DS, "id": "clip=4/momentum=0.9/nesterov", "clip": 4.0, "momentum": 0.9, "nesterov": True},
    {**DS, "id": "clip=4/sharded/dense_below=16", "clip": 4.0, "transport": "sharded", "dense_below": 16},
]
WARMUP = [
    # warm-up of the ratio: 0.9 -> 0.3 over 8 of the 12 steps (the payloads' lengths change every step), with the
    # server's Top-k 50% warming alike; sharded with Rand-k, the allreduce of shared Rand-k, a composition
    {**DS, "id": "warmup=8/momentum=0.9", "warmup": [8, 0.9], "momentum": 0.9},
    {**DS, "id": "warmup=8/sharded/randk", "warmup": [8, 0.9], "compressor": "randk:0.3", "transport": "sharded"},
    {**DS, "id": "warmup=8/randk:0.3,shared", "warmup": [8, 0.9], "compressor": "randk:0.3,shared"},
    {**DS, "id": "warmup=8/topk:0.3+natural/no server", "warmup": [8, 0.9], "compressor": "topk:0.3+natural",
     "server": None},
    # 1-bit Adam's warm-up: 8 steps uncompressed (server pass included), then the compressors (ops.Either)
    {**DS, "id": "warmup=8,dense", "warmup": [8, "dense"]},
    {**DS, "id": "warmup=8,dense/sharded/natural", "warmup": [8, "dense"], "compressor": "natural",
     "transport": "sharded"},
]
# the first with per-variable step counts that differ (the head's gradient is None on odd steps)
CHECKPOINTS = [{**DS, "id": "ckpt/topk-ds", "checkpoint": True, "extra_every_step": False},
               {**DS, "id": "ckpt/momentum=0.9/nesterov/warmup=16", "momentum": 0.9, "nesterov": True,
                "warmup": [16, 0.9], "checkpoint": True},   # resumed in the middle of the warm-up
               {**DS, "id": "ckpt/randk-ef-qsgd-server/sharded", "compressor": "randk:0.3", "server": "qsgd:4",
                "transport": "sharded", "checkpoint": True}]
# Tracing a step function per case is most of this file's time (about 2 s a trace). By default: on 2 ranks every
# compressor x mode on the built-in transport, sharded for four compressors (sparse, summable, bits, codes) in
# the modes that take its two paths (plain: the exact average travels; DoubleSqueeze: the server pass on each
# slice), the other transports and Deep Gradient Compression's options; on 3 ranks the DoubleSqueeze mode (every
# n-rank path), sharded for the same four, four of the options' cases and the warm-ups. HVD_COMPRESS_TF_MATRIX=all:
# every compressor x mode x transport on 2 and 3 ranks (README, Tests).
EVERY = os.environ.get("HVD_COMPRESS_TF_MATRIX") == "all"
FEW = ("topk:0.3/", "randk:0.3,shared/", "sign/", "natural/")   # by default sharded (and hierarchical): these
if EVERY:
    CASES_2 = CASES + SHARDED + TRANSPORTS + MOMENTUM + WARMUP
    CASES_3 = CASES + SHARDED + TRANSPORTS + MOMENTUM + WARMUP
else:
    CASES_2 = CASES + [c for c in SHARDED if "/ef/" not in c["id"] and c["id"].startswith(FEW)] + TRANSPORTS + \
        MOMENTUM + WARMUP
    CASES_3 = [c for c in CASES if "/doublesqueeze" in c["id"]] + \
        [c for c in SHARDED if "/doublesqueeze" in c["id"] and c["id"].startswith(FEW)] + \
        MOMENTUM[:2] + MOMENTUM[-2:] + WARMUP
# Grappler, TensorFlow's graph optimizer, is much of a step function's first call: on 3 ranks it is off (the
# launch took 117-121 s instead of 141-158). The 2-rank launch checks every case with its rewrites, as users run.
CASES_3 = [{**c, "grappler": False} for c in CASES_3]
LAUNCHERS = {2: "horovodrun", 3: "mpirun"}
TORCH_STATS_KEYS = {"steps", "skipped_steps", "last_step_skipped", "bytes_sent", "dense_bytes", "ratio",
                    "dense_small_bytes", "variance", "worker_error_norm", "server_error_norm", "total_bytes_sent",
                    "total_dense_bytes", "transports", "buckets", "link_gbps", "worker_ratio",
                    "server_ratio"}


def _tf_run(n, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tfrun{n}")
    (out / "cases.json").write_text(json.dumps(CASES_2 + CHECKPOINTS if n == 2 else CASES_3))
    proc = launch(n, DISTRIBUTED / "tf_worker.py", out / "cases.json", out, launcher=LAUNCHERS[n], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:]
    ranks = []
    for r in range(n):
        with open(out / f"rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    return n, ranks, result_line(proc)


# one launch per number of ranks for the whole module (tests pick theirs with request.getfixturevalue)
@pytest.fixture(scope="module")
def tf_run2(tmp_path_factory):
    return _tf_run(2, tmp_path_factory)


@pytest.fixture(scope="module")
def tf_run3(tmp_path_factory):
    return _tf_run(3, tmp_path_factory)


def test_checkpoint_at_10_resumes_equal_to_uninterrupted_20(tf_run2):
    n, _, report = tf_run2
    assert report == {c["id"]: {"parameters_equal": True, "error_buffers_equal": True} for c in CHECKPOINTS}


@pytest.mark.parametrize("n, case", [(2, c) for c in CASES_2] + [(3, c) for c in CASES_3],
                         ids=[f"{n}ranks-{LAUNCHERS[n]}-{c['id']}" for n, cs in ((2, CASES_2), (3, CASES_3)) for c in cs])
def test_matches_simulation_and_replicas_identical(request, n, case):
    from tf_common import names_of, train_reference
    _, ranks, _ = request.getfixturevalue(f"tf_run{n}")
    reference = train_reference(case, n, case["steps"])
    for name, v in zip(names_of(reference), reference):
        for r in range(1, n):
            assert np.array_equal(ranks[r][case["id"]][name], ranks[0][case["id"]][name]), f"rank {r}: {name}"
        got, expected = ranks[0][case["id"]][name], v.numpy()
        err = np.abs(got - expected).max()
        assert err <= 1e-9 * max(1.0, np.abs(expected).max()), f"{name}: off by {err}"
    stats = ranks[0][case["id"]]["_stats"]
    assert stats["steps"] == case["steps"] and stats["total_bytes_sent"] > 0
    assert stats.keys() == TORCH_STATS_KEYS   # the same keys as the PyTorch plug-in's stats()
    how = set(stats["transports"].values())
    if case.get("transport") == "auto":   # auto mixes: dense for the smallest variables, compressed for the rest
        assert "dense" in how and len(how) == 2, stats["transports"]
    elif case.get("dense_below"):
        assert how == {"dense", case.get("transport", "allgather")}, stats["transports"]
        assert stats["dense_small_bytes"] > 0
    else:
        assert how == {case.get("transport") or ("allreduce" if ",shared" in case["compressor"] or
                                                 case["compressor"] == "none" else "allgather")}, how
    if case.get("warmup"):   # the warm-up is over: the ratios in force are the compressors' own
        assert stats["worker_ratio"] == (None if case["compressor"] == "natural" else 0.3)
        assert stats["server_ratio"] == (0.5 if case["server"] else None)
        assert stats["total_bytes_sent"] > case["steps"] * stats["bytes_sent"]   # the first payloads were larger


def _node_cases():
    """transport="hierarchical" on 2 nodes x 2 ranks: the four compressors of FEW with DoubleSqueeze (every
    compressor with HVD_COMPRESS_TF_MATRIX=all), Top-k with error feedback, sign plain, and the options around
    it; 6 steps, Grappler off (as on 3 ranks)."""
    node, steps = {"transport": "hierarchical", "local_size": 2, "extra_every_step": True, "grappler": False}, 6
    cases = [{**c, **node, "id": c["id"] + "/hierarchical"} for c in cases_of_every_compressor_and_mode(steps)
             if "k=" not in c["compressor"] and ("server" in c and (EVERY or c["id"].startswith(FEW))
                                                 or c["id"] in ("topk:0.3/ef", "sign/plain"))]
    ds = {**DS, **node, "steps": steps}
    return cases + [
        {**ds, "id": "hierarchical/dense_below=16", "dense_below": 16},
        {**ds, "id": "hierarchical/warmup=3/randk", "warmup": [3, 0.9], "compressor": "randk:0.3"},
        {**ds, "id": "hierarchical/momentum=0.9/no masking/clip=4", "momentum": 0.9, "momentum_masking": False,
         "clip": 4.0},
    ]


NODE_CASES = _node_cases()
NODE_CHECKPOINT = {**DS, "id": "ckpt/hierarchical", "transport": "hierarchical", "local_size": 2, "checkpoint": True}


@pytest.fixture(scope="module")
def tf_two_nodes(tmp_path_factory):
    """One launch on two "nodes" of 2 ranks on this machine (Horovod's local ranks; dynamic process sets)."""
    out = tmp_path_factory.mktemp("tfnodes")
    (out / "cases.json").write_text(json.dumps(NODE_CASES + [NODE_CHECKPOINT]))
    proc = launch(4, DISTRIBUTED / "tf_worker.py", out / "cases.json", out, hosts="localhost:2,127.0.0.1:2",
                  env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"}, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:]
    ranks = []
    for r in range(4):
        with open(out / f"rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    return ranks, result_line(proc)


@pytest.mark.parametrize("case", NODE_CASES, ids=[c["id"] for c in NODE_CASES])
def test_hierarchical_on_two_nodes_matches_simulation(tf_two_nodes, case):
    from tf_common import names_of, train_reference
    ranks, _ = tf_two_nodes
    reference = train_reference(case, 4, case["steps"])
    for name, v in zip(names_of(reference), reference):
        for r in range(1, 4):
            assert np.array_equal(ranks[r][case["id"]][name], ranks[0][case["id"]][name]), f"rank {r}: {name}"
        err = np.abs(ranks[0][case["id"]][name] - v.numpy()).max()
        assert err <= 1e-9 * max(1.0, np.abs(v.numpy()).max()), f"{name}: off by {err}"
    stats = ranks[0][case["id"]]["_stats"]
    assert set(stats["transports"].values()) == ({"hierarchical", "dense"} if case.get("dense_below") else
                                                 {"hierarchical"}), stats["transports"]
    assert stats.keys() == TORCH_STATS_KEYS and stats["steps"] == case["steps"]


def test_hierarchical_checkpoint_resumes_equal(tf_two_nodes):
    """state_dict() at step 10 (each rank's slice of its error buffers, the server slices of node 0's ranks),
    loaded on every rank, then 10 steps: equal to 20 straight."""
    _, report = tf_two_nodes
    assert report == {NODE_CHECKPOINT["id"]: {"parameters_equal": True, "error_buffers_equal": True}}


def test_process_set_of_2_of_3_ranks_equals_the_simulation_of_2(tmp_path):
    """hvd.DistributedGradientTape(process_set=) on ranks 1 and 2 of 3: the Compression takes the tape's set at
    the first step, every collective runs on it (allgather and allreduce payloads, the root's broadcast from
    global rank 1, state_dict), and a Compression given another set is refused instead of waiting forever."""
    from tf_common import names_of, train_reference
    cases = [c for c in CASES if c["id"] in ("topk:0.3/doublesqueeze", "randk:0.3,shared/doublesqueeze")]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = launch(3, DISTRIBUTED / "tf_process_set.py", tmp_path / "cases.json", tmp_path, launcher="mpirun",
                  timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "reduced on the process set [1, 2] but this Compression was given [0, 1, 2]" in \
        result_line(proc)["refused"], result_line(proc)
    ranks = []
    for r in (1, 2):
        with open(tmp_path / f"rank{r}.pkl", "rb") as f:
            ranks.append(pickle.load(f))
    for case in cases:
        assert ranks[0][case["id"]]["_state"] == {"size": 2, "workers": 2}
        reference = train_reference(case, 2, case["steps"])
        for name, v in zip(names_of(reference), reference):
            assert np.array_equal(ranks[0][case["id"]][name], ranks[1][case["id"]][name]), name
            assert np.abs(ranks[0][case["id"]][name] - v.numpy()).max() <= 1e-9 * max(1.0, np.abs(v.numpy()).max())


def test_counterexample_top1_diverges_and_error_feedback_converges():
    proc = launch(3, DISTRIBUTED / "tf_counterexample.py", 20, 300, 0.05, 0.1, launcher="mpirun")
    assert proc.returncode == 0, proc.stdout[-5000:]
    for eta, r in result_line(proc).items():
        for step in r["growth"]:
            assert step == pytest.approx([1 + 11 * float(eta) / 6] * 3, rel=1e-12)
        assert r["ef_norms"][-1] < 1e-6 * r["ef_norms"][0]


KERAS_FITS = [("", "keras"), ("topk:0.5", "keras"), ("topk:0.5", "tensorflow")]


@pytest.fixture(scope="module")
def keras_fits():
    """One launch (one TensorFlow start-up) for every configuration of Keras fit."""
    proc = launch(2, DISTRIBUTED / "keras_worker.py", *(f"topk:0.3,{s},{w}" for s, w in KERAS_FITS))
    assert proc.returncode == 0, proc.stdout[-5000:]
    return result_line(proc)


@pytest.mark.parametrize("server, wrapper", KERAS_FITS)
def test_keras_fit_averages_with_identical_weights(keras_fits, server, wrapper):
    r = keras_fits[f"topk:0.3,{server},{wrapper}"]
    # TopK 30% uplink costs 0.45 of dense (6 bytes per kept float32: a 2-byte index and the value); the root
    # adds the server's TopK 50% (0.75)
    assert r["identical"] and r["steps"] == 2 * 256 // 32
    assert r["ratio"] == pytest.approx(0.45 + (0.75 if server else 0.0), abs=0.05)


@pytest.fixture(scope="module")
def tf_bad_setups():
    """One launch for the bad set-ups (each TensorFlow start-up and trace costs half a minute)."""
    proc = launch(2, DISTRIBUTED / "tf_bad_input.py", "mismatch", "nan", "skip", "skip-sharded", timeout=400)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc


@pytest.mark.parametrize("scenario, error, words", [
    ("mismatch", "ValueError", ["configured differently on different ranks"]),
    ("nan", "InvalidArgumentError", ["2/w2:0", "the gradient is not finite (NaN or Inf) on some rank"]),
])
def test_bad_setup_fails_clearly_on_every_rank(tf_bad_setups, scenario, error, words):
    out = tf_bad_setups.stdout
    caught = [line for line in out.splitlines() if f"{scenario} CAUGHT" in line]
    assert len(caught) == 2, out[-5000:]
    for line in caught:
        assert f"CAUGHT {error}: " in line and all(w in line for w in words), line
    if scenario == "nan":   # nonfinite="raise": the step's earlier variables had committed; all is undone
        assert out.count("nan BUFFER_UNCHANGED True") == 2, out[-3000:]
        assert out.count("nan TRAINED_ON 5") == 2, out[-3000:]


def test_nonfinite_steps_are_skipped_alike_and_leave_every_buffer(tf_bad_setups):
    # NaN in the first, a middle and the last variable of a step, on either rank; with the sharded transport
    # and the small variables dense, the middle one (w2) is a dense one
    for scenario, r in result_line(tf_bad_setups).items():
        assert r == {"nan_seen": [True] * 3, "unchanged": [True] * 3, "skipped_steps": 3, "identical": True,
                     "equals_simulation": True}, (scenario, r)
    assert set(result_line(tf_bad_setups)) == {"skip", "skip-sharded"}


def test_single_process_behaviour_and_refusals(tmp_path):
    import subprocess
    from conftest import ROOT
    proc = subprocess.run([sys.executable, str(DISTRIBUTED / "tf_single.py"), str(tmp_path)], cwd=ROOT, text=True,
                          timeout=300,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert result_line(proc) == {k: True for k in result_line(proc)}, result_line(proc)
