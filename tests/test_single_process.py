"""hvd_compress.torch.Compression in one process (Horovod initialised with one rank)."""
import pytest
import torch

import hvd_compress.torch as hc
from hvd_compress.simulate import Simulation


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _train(model, optimizer, steps=5):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
        optimizer.step()


def test_one_process_horovod_skips_compression(horovod):
    """With one process, hvd.DistributedOptimizer registers no hooks and never calls compress(): training
    is plain local SGD on the uncompressed gradient, and stats() reports that no step was compressed."""
    model, plain = _model(), _model()
    compression = hc.Compression("topk:0.1", error_feedback=True, named_parameters=model.named_parameters(),
                                 dense_below=0)
    _train(model, horovod.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                               named_parameters=model.named_parameters(), compression=compression))
    _train(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    stats = compression.stats()
    assert stats["steps"] == 0 and stats["bytes_sent"] == 0 and stats["total_bytes_sent"] == 0


def test_direct_calls_with_one_rank_equal_the_simulation(horovod):
    """Calling compress()/decompress() as Horovod does, with n = 1: the pipeline equals its simulation."""
    model = _model()
    compression = hc.Compression("topk:0.3", error_feedback=True, server="natural",
                                 named_parameters=model.named_parameters(), dense_below=0)
    sim = Simulation("topk:0.3", error_feedback=True, server="natural", n=1)
    _direct_steps_equal_the_simulation(horovod, model, compression, sim, torch.Generator().manual_seed(2))
    assert compression.stats()["steps"] == 4


def _direct_steps_equal_the_simulation(horovod, model, compression, sim, gen, steps=4):
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        model(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        sent = {n: compression.compress(p.grad) for n, p in model.named_parameters()}
        got = {n: compression.decompress(horovod.allreduce(marker), ctx) for n, (marker, ctx) in sent.items()}
        expected = sim.step([grads])
        for n in grads:
            assert torch.equal(got[n], expected[n]), (step, n)


def test_sign_errors_owe_their_correction_until_a_reader_settles_them(horovod):
    """ScaledSign / OneBit steps leave x in the error buffers and their last correction to the next step (one
    pass over memory instead of two): the steps equal the simulation, state_dict() holds its error buffers, and
    an elastic commit settles them before it copies them."""
    from hvd_compress.torch import kernels as K
    model = _model()
    compression = hc.Compression("sign", error_feedback=True, server="onebit",
                                 named_parameters=model.named_parameters(), dense_below=0)
    sim = Simulation("sign", error_feedback=True, server="onebit", n=1)
    gen = torch.Generator().manual_seed(3)
    _direct_steps_equal_the_simulation(horovod, model, compression, sim, gen)
    buffers = list(compression._worker_error.values()) + list(compression._server_error.values())
    assert len(buffers) == 8 and all(K._owed_by(e) is not None for e in buffers)
    state = compression.state_dict()
    assert not any(K._owed_by(e) is not None for e in buffers)
    for n, e in state["worker_error"][0].items():
        assert torch.equal(e, sim.worker_error[0][n].reshape(-1)), n
    for n, d in state["server_error"].items():
        assert torch.equal(d, sim.server_error[n].reshape(-1)), n
    _direct_steps_equal_the_simulation(horovod, model, compression, sim, gen, steps=1)   # owed again
    assert all(K._owed_by(e) is not None for e in compression._worker_error.values())
    hc.elastic.TorchState(model=model, optimizer=None, compression=compression)   # commits (saves) at once
    assert not any(K._owed_by(e) is not None for e in compression._worker_error.values())


def test_state_dict_round_trip_and_refusals(horovod):
    model = _model()
    compression = hc.Compression("topk:0.3", error_feedback=True, named_parameters=model.named_parameters(),
                                 dense_below=0)
    model(torch.randn(2, 4)).sum().backward()
    sent = [compression.compress(p.grad) for p in model.parameters()]
    with pytest.raises(RuntimeError, match="during a step"):
        compression.state_dict()
    for marker, ctx in sent:
        compression.decompress(horovod.allreduce(marker), ctx)
    state = compression.state_dict()
    assert state["size"] == 1 and state["step"] == 1 and len(state["worker_error"][0]) == 4
    other = hc.Compression("topk:0.3", error_feedback=True, named_parameters=model.named_parameters(),
                           dense_below=0)
    other.load_state_dict(state)
    restored = other.state_dict()
    assert restored["step"] == 1
    assert all(torch.equal(t, state["worker_error"][0][n]) for n, t in restored["worker_error"][0].items())
    different = hc.Compression("randk:0.3", error_feedback=True, named_parameters=model.named_parameters(),
                               dense_below=0)
    with pytest.raises(ValueError, match="different configuration"):
        different.load_state_dict(state)
    with pytest.raises(ValueError, match="saved with 3 ranks"):
        other.load_state_dict({**state, "size": 3})
    with pytest.raises(ValueError, match="not an hvd_compress state dict"):
        other.load_state_dict({"weights": 1})


@pytest.mark.parametrize("kwargs, error, words", [
    ({"compressor": "topk:0"}, ValueError, "k must be an integer >= 1, got 0"),
    ({"compressor": "topk:1.5"}, ValueError, "ratio must be a number in (0, 1], got 1.5"),
    ({"compressor": hc.TopK}, ValueError, "a compressor spec must be a string"),
    ({"compressor": "zip"}, ValueError, "unknown compressor spec 'zip'"),
    ({"compressor": "topk:0.1", "server": "bogus:3"}, ValueError, "unknown compressor spec 'bogus:3'"),
    ({"compressor": "topk:0.1", "named_parameters": None}, ValueError, "needs named_parameters"),
    ({"compressor": "topk:0.1", "named_parameters": [("a", torch.zeros(1)), ("a", torch.zeros(1))]},
     ValueError, "'a' appears twice"),
    ({"compressor": "topk:0.1", "transport": "ring"}, ValueError, "unknown transport 'ring'"),
    ({"compressor": "topk:0.1", "transport": "allreduce"}, ValueError, "transport 'allreduce' needs summable"),
    ({"compressor": "topk:0.1", "transport": "auto", "link_gbps": -1}, ValueError,
     "link bandwidth must be a positive number of Gbit/s, got -1"),
    ({"compressor": "topk:0.1", "link_gbps": 10}, ValueError, "link_gbps=10 is only used by transport='auto'"),
    ({"compressor": "topk:0.1", "dense_below": -1}, ValueError,
     "dense_below must be an integer >= 0 (elements), got -1"),
    ({"compressor": "topk:0.1", "bucket_mb": 0}, ValueError, "bucket_mb must be a number > 0, got 0"),
    ({"compressor": "topk:0.1", "error_feedback": True, "momentum": 1.0}, ValueError,
     "momentum must be a number in [0, 1), got 1.0"),
    ({"compressor": "topk:0.1", "momentum": 0.9}, ValueError,
     "momentum=0.9 (momentum correction) needs error_feedback"),
    ({"compressor": "sign", "error_feedback": True, "momentum": 0.9}, ValueError, "needs a sparsifying compressor"),
    ({"compressor": "topk:0.1", "error_feedback": True, "momentum": 0.9, "momentum_masking": 0}, ValueError,
     "momentum_masking must be True or False, got 0"),
    ({"compressor": "topk:0.1", "error_feedback": True, "momentum_masking": False}, ValueError,
     "momentum_masking=False needs momentum correction"),
    ({"compressor": "topk:0.1", "error_feedback": True, "nesterov": True}, ValueError,
     "nesterov=True needs momentum correction"),
    ({"compressor": "topk:0.1", "error_feedback": True, "momentum": 0.9, "nesterov": 1}, ValueError,
     "nesterov must be True or False, got 1"),
    ({"compressor": "topk:k=3", "warmup": 10}, ValueError, "needs a sparsifier given by ratio="),
    ({"compressor": "topk:0.1", "warmup": -1}, ValueError, "warmup must be a number of steps >= 0"),
    ({"compressor": "topk:0.1", "warmup": (10, 0)}, ValueError,
     'first ratio must be a number in (0, 1] or "dense", got 0'),
    ({"compressor": "topk:0.1", "clip": -1}, ValueError, "clip must be a finite number >= 0 (a gradient norm"),
    ({"compressor": "topk:0.1", "clip": float("inf")}, ValueError, "clip must be a finite number >= 0"),
    ({"compressor": "topk:0.1", "clip": True}, ValueError, "clip must be a finite number >= 0"),
])
def test_constructor_refuses_bad_arguments(kwargs, error, words):
    kwargs.setdefault("named_parameters", _model().named_parameters())
    with pytest.raises(error) as info:
        hc.Compression(**kwargs)
    assert words in str(info.value)


def test_compress_refuses_foreign_and_non_floating_tensors(horovod):
    model = _model()
    counts = torch.zeros(3, dtype=torch.int64)
    counts.grad = torch.ones(3, dtype=torch.int64)
    compression = hc.Compression("topk:0.5", named_parameters=[*model.named_parameters(), ("counts", counts)],
                                 dense_below=0)
    with pytest.raises(ValueError, match=r"not the .grad of any parameter"):
        compression.compress(torch.ones(3))
    with pytest.raises(TypeError, match="parameter 'counts': gradients must be floating point, got torch.int64"):
        compression.compress(counts.grad)


def test_non_finite_gradient_is_refused_and_buffers_kept(horovod):
    model = _model()
    compression = hc.Compression("topk:0.3", error_feedback=True, named_parameters=model.named_parameters(),
                                 dense_below=0, nonfinite="raise")

    def step(poison):
        model.zero_grad(set_to_none=True)
        model(torch.randn(2, 4)).sum().backward()
        if poison:
            model[0].bias.grad[1] = float("inf")
        sent = [compression.compress(p.grad) for p in model.parameters()]
        return [compression.decompress(horovod.allreduce(m), ctx) for m, ctx in sent]

    step(False)
    before = compression.state_dict()
    with pytest.raises(FloatingPointError, match=r"\['0.bias'\] on some rank \(on this rank: \['0.bias'\]\)"):
        step(True)
    after = compression.state_dict()
    assert after["step"] == before["step"] == 1
    assert all(torch.equal(before["worker_error"][0][n], t) for n, t in after["worker_error"][0].items())
    step(False)   # and the next step goes on normally
    assert compression.stats()["steps"] == 2


def test_non_finite_gradient_skips_the_step_by_default(horovod):
    """As a dense allreduce: every gradient of the step comes back non-finite, no buffer changes, the step
    is counted as skipped and repeated with the same seeds; the next step is normal."""
    model = _model()
    compression = hc.Compression("natural", error_feedback=True, server="topk:0.5",
                                 named_parameters=model.named_parameters(), dense_below=0)
    reference = hc.Compression("natural", error_feedback=True, server="topk:0.5",
                               named_parameters=model.named_parameters(), dense_below=0)

    def step(comp, grads):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        sent = [comp.compress(p.grad) for p in model.parameters()]
        return [comp.decompress(horovod.allreduce(m), ctx) for m, ctx in sent]

    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(3)]
    poisoned = [g.clone() for g in grads[1]]
    poisoned[1][0] = float("inf")
    step(compression, grads[0])
    before = compression.state_dict()
    out = step(compression, poisoned)
    assert all(torch.isnan(o).all() for o in out)
    after = compression.state_dict()
    assert all(torch.equal(before["worker_error"][0][n], t) for n, t in after["worker_error"][0].items())
    stats = compression.stats()
    assert stats["steps"] == 1 and stats["skipped_steps"] == 1 and stats["last_step_skipped"]
    # the run goes on as if the bad step had never happened
    got = [step(compression, grads[1]), step(compression, grads[2])]
    expected = [step(reference, grads[0]) and step(reference, grads[1]), step(reference, grads[2])]
    for a, b in zip(got, expected):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert compression.stats()["steps"] == 3 and not compression.stats()["last_step_skipped"]


def test_clip_scales_each_workers_tensor_down_to_clip_over_sqrt_n():
    """Local gradient clipping in the simulation (which every multi-rank clip case must equal): a tensor
    longer than clip / sqrt(n) is scaled to that norm on its worker, a shorter one is left alone."""
    from hvd_compress.simulate import Simulation
    n, clip = 4, 2.0
    grads = [{"long": torch.full((4,), float(r + 1), dtype=torch.float64),      # norms 2, 4, 6, 8 > 1
              "short": torch.full((4,), 0.1 * (r + 1), dtype=torch.float64)}   # norms <= 0.8 < 1
             for r in range(n)]
    update = Simulation("none", n=n, clip=clip).step(grads)
    threshold = clip / n ** 0.5
    long = sum(g["long"] * (threshold / (g["long"].norm() + 1e-6)) for g in grads) / n
    assert torch.allclose(update["long"], long, rtol=1e-12)
    assert torch.equal(update["short"], sum(g["short"] for g in grads) / n)
    assert torch.allclose(update["long"].norm(), torch.tensor(threshold, dtype=torch.float64), rtol=1e-5)


def _against_adamw(horovod, optimizer_class, steps):
    """Seeded float64 weights and ``steps`` steps of gradients; two copies of the weights: ``optimizer_class``
    (freeze_after=3) under hvd.DistributedOptimizer on the first, torch's AdamW on the second, both lr 0.1 and
    weight decay 0.05. Returns (weights, grads, mine, plain, optimizer, adamw)."""
    torch.manual_seed(0)
    weights = [torch.randn(5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(steps)]
    mine = [w.clone().requires_grad_() for w in weights]
    plain = [w.clone().requires_grad_() for w in weights]
    opt = horovod.DistributedOptimizer(optimizer_class(mine, lr=0.1, weight_decay=0.05, freeze_after=3),
                                       named_parameters=[(f"w{i}", w) for i, w in enumerate(mine)])
    return weights, grads, mine, plain, opt, torch.optim.AdamW(plain, lr=0.1, weight_decay=0.05)


def test_frozen_variance_adamw_is_adamw_then_freezes_v(horovod):
    """FrozenVarianceAdamW: AdamW bit for bit for freeze_after steps, then v stays and the step follows the
    documented formula; hvd.DistributedOptimizer, which rebuilds the optimizer from its groups, keeps it."""
    _, grads, mine, plain, opt, ref = _against_adamw(horovod, hc.FrozenVarianceAdamW, 6)
    assert [g["freeze_after"] for g in opt.param_groups] == [3]
    for step, gs in enumerate(grads, 1):
        for w, p, g in zip(mine, plain, gs):
            w.grad, p.grad = g.clone(), g.clone()
        before = [(w.detach().clone(), opt.state[w]["exp_avg"].clone(), opt.state[w]["exp_avg_sq"].clone())
                  for w in mine] if step > 3 else None
        opt.step()
        ref.step()
        if step <= 3:   # AdamW itself
            assert all(torch.equal(w, p) for w, p in zip(mine, plain))
            continue
        for w, g, (w0, m0, v0) in zip(mine, gs, before):
            assert torch.equal(opt.state[w]["exp_avg_sq"], v0)   # frozen
            m = m0.lerp(g, 0.1)
            expected = w0 * (1 - 0.1 * 0.05) - 0.1 / (1 - 0.9 ** step) * m / ((v0 / (1 - 0.999 ** 3)).sqrt() + 1e-8)
            assert torch.allclose(w.detach(), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="freeze_after must be a number of steps >= 1, got 0"):
        hc.FrozenVarianceAdamW(mine, freeze_after=0)


def test_momentum_corrected_adamw_where_nothing_is_compressed(horovod):
    """MomentumCorrectedAdamW where nothing is compressed (the Compression's velocity u <- 0.9 u + g, done by
    hand on what backward hands over): AdamW to rounding for freeze_after steps; then its hook divides g by
    the frozen denominator d and restarts u once, and the step is w (1 - lr wd) - lr / (1 - 0.9^t) 0.1 r
    with r <- 0.9 r + d g from r = 0. hvd.DistributedOptimizer, which rebuilds the optimizer from its groups,
    keeps it; a checkpoint taken after the freeze hooks the parameters of the optimizer it is loaded into."""
    weights, pulls, mine, ref, opt, adamw = _against_adamw(horovod, hc.MomentumCorrectedAdamW, 8)
    velocity = [torch.zeros_like(w) for w in weights]
    restarted = [torch.zeros_like(w) for w in weights]
    for step, gs in enumerate(pulls, 1):
        opt.zero_grad()
        sum((w * g).sum() for w, g in zip(mine, gs)).backward()   # the gradient of w is g (hooked)
        for i, (w, p, g) in enumerate(zip(mine, ref, gs)):
            velocity[i] = 0.9 * velocity[i] + w.grad
            w.grad, p.grad = velocity[i].clone(), g
        if step <= 3:
            opt.step()
            adamw.step()
            assert all(torch.allclose(w, p, rtol=0, atol=1e-12) for w, p in zip(mine, ref)), step
            continue
        before = [w.detach().clone() for w in mine]
        opt.step()
        for i, (w, g, w0) in enumerate(zip(mine, gs, before)):
            d = 1 / ((adamw.state[ref[i]]["exp_avg_sq"] / (1 - 0.999 ** 3)).sqrt() + 1e-8)
            restarted[i] = 0.9 * restarted[i] + d * g
            expected = w0 * (1 - 0.1 * 0.05) - 0.1 / (1 - 0.9 ** step) * 0.1 * restarted[i]
            assert torch.allclose(w.detach(), expected, rtol=0, atol=1e-12), (step, i)
        assert "velocity" not in opt.state[mine[0]] and "preconditioner" in opt.state[mine[0]]
        if step == 5:
            saved = opt.state_dict()
    again = [w.detach().clone().requires_grad_() for w in mine]
    other = hc.MomentumCorrectedAdamW(again, lr=0.1, weight_decay=0.05, freeze_after=3)
    other.load_state_dict(saved)
    sum((w * g).sum() for w, g in zip(again, pulls[0])).backward()
    for w, g, s in zip(again, pulls[0], other.state.values()):
        assert torch.equal(w.grad, g * s["preconditioner"])


def test_dense_warmup_sends_the_first_steps_uncompressed():
    """warmup=(steps, "dense") (1-bit Adam's warm-up): exact averages first, then the compressor."""
    sim = Simulation("topk:0.25", error_feedback=True, n=2, warmup=(2, "dense"))
    grads = [{"w": torch.arange(8, dtype=torch.float64) * (r + 1)} for r in range(2)]
    for step in range(3):
        update = sim.step(grads)["w"]
        if step < 2:
            assert torch.equal(update, (grads[0]["w"] + grads[1]["w"]) / 2)
            assert not sim.worker_error[0]["w"].any()   # nothing left out
        else:
            assert int((update != 0).sum()) == 2   # Top-k 25% of 8: the same 2 on both ranks


def test_stats_keys_are_the_ones_the_tensorflow_plug_in_reports_too():
    """tests/test_tf_distributed.py checks the TensorFlow plug-in's stats() against this same set."""
    from test_tf_distributed import TORCH_STATS_KEYS
    assert hc.Compression("topk:0.5", named_parameters=_model().named_parameters()).stats().keys() == TORCH_STATS_KEYS


def test_host_staging_setting(monkeypatch):
    """HVD_COMPRESS_HOST_STAGING: 1 stages every collective on a host copy (a CPU tensor too), 0 none; unset,
    device tensors only when Horovod has no GPU operations; anything else is refused by name."""
    from hvd_compress.torch import ops
    t = torch.ones(3)
    try:
        for value, staged in (("1", True), ("0", False), ("", False)):
            monkeypatch.setenv("HVD_COMPRESS_HOST_STAGING", value)
            ops.host_staging.cache_clear()
            assert ops.staged(t) is staged
            handed = ops.for_horovod(t)
            assert torch.equal(handed, t) and (handed is not t) is staged
        monkeypatch.setenv("HVD_COMPRESS_HOST_STAGING", "yes")
        ops.host_staging.cache_clear()
        with pytest.raises(ValueError, match="HVD_COMPRESS_HOST_STAGING='yes'"):
            ops.staged(t)
    finally:
        monkeypatch.delenv("HVD_COMPRESS_HOST_STAGING")
        ops.host_staging.cache_clear()
