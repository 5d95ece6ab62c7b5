"""The cost model and the automatic choice of hvd_compress.transport (pure functions, no Horovod)."""
import pytest

from hvd_compress import compressors as C
from hvd_compress import transport as T

TOPK_EF = C.Config(C.TopK(ratio=0.01), True, None)
TOPK_DS = C.Config(C.TopK(ratio=0.01), True, C.TopK(ratio=0.01))


def test_slices_cover_the_tensor_in_nearly_equal_parts():
    for d in (0, 1, 3, 10, 1001):
        for n in (1, 2, 3, 4, 7):
            b = T.bounds(d, n)
            sizes = [b[j + 1] - b[j] for j in range(n)]
            assert b[0] == 0 and b[-1] == d and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("config", [TOPK_EF, TOPK_DS], ids=["ef", "doublesqueeze"])
def test_sharded_bytes_per_rank_are_flat_in_n_and_allgather_grows(config):
    d = 25_000_000
    sharded = [T.traffic("sharded", config, d, n)[0] for n in (2, 4, 8, 64, 1024)]
    allgather = [T.traffic("allgather", config, d, n)[0] for n in (2, 4, 8, 64, 1024)]
    bound = config.worker.wire_bytes(d) + (config.server or C.Identity()).wire_bytes(d)
    assert all(b <= bound * 1.01 for b in sharded)
    assert allgather[-1] > 500 * allgather[0]


def test_dense_ring_allreduce_bytes():
    assert T.traffic("dense", TOPK_EF, 1000, 4) == (2 * 3 / 4 * 4000, 0)   # fused: no messages of its own
    assert T.traffic("dense", TOPK_EF, 1000, 1) == (0, 0)


def test_auto_keeps_small_tensors_dense_and_compresses_large_ones_on_slow_links():
    slow, fast = T.Link.gbit(1), T.Link.gbit(1000, latency_us=1)
    assert T.choose(TOPK_EF, 10, 4, slow) == "dense"              # fixed costs of compressing dominate
    assert T.choose(TOPK_EF, 25_000_000, 4, slow) != "dense"     # 100 MB at 1 Gbit/s: compress
    assert T.choose(TOPK_EF, 25_000_000, 64, slow) == "sharded"  # allgather grows with n
    assert T.choose(TOPK_EF, 25_000_000, 4, fast) == "dense"     # kernels cost more than the wire saves


def test_auto_never_models_slower_than_dense():
    for n in (2, 4, 16, 256):
        for gbit in (0.1, 1, 10, 100):
            link = T.Link.gbit(gbit)
            for d in (100, 10_000, 1_000_000, 25_000_000):
                for config in (TOPK_EF, TOPK_DS, C.Config(C.Natural(), False, None)):
                    best = T.choose(config, d, n, link)
                    assert T.step_seconds(best, config, d, n, link) <= T.step_seconds("dense", config, d, n, link)


def test_resolve_and_check():
    assert T.resolve(None, TOPK_EF, 100, 2) == "allgather"
    assert T.resolve(None, C.Config(C.RandK(ratio=0.1, shared=True), False, None), 100, 2) == "allreduce"
    assert T.resolve("sharded", TOPK_EF, 100, 2) == "sharded"
    with pytest.raises(ValueError, match="needs a link"):
        T.resolve("auto", TOPK_EF, 100, 2)
    with pytest.raises(ValueError, match="unknown transport 'tree'"):
        T.check("tree", TOPK_EF)


@pytest.mark.parametrize("spec, server", [("topk:0.3", "topk:0.5"), ("natural:det", None), ("sign", "sign")])
def test_hierarchical_simulation_with_one_rank_per_node_is_the_flat_pipeline(spec, server):
    """Nodes of one rank: each node's average is its rank's gradient and there is one slice, so
    "hierarchical" is the flat pipeline (allgather) step for step (for deterministic compressors: random ones
    draw by slice name); with two ranks per node it is not."""
    import torch
    from hvd_compress.simulate import Simulation

    gen = torch.Generator().manual_seed(0)
    grads = [[{"w": torch.randn(40, generator=gen, dtype=torch.float64)} for _ in range(4)] for _ in range(5)]
    runs = {how: Simulation(spec, True, server, n=4, transport=how, local_size=size)
            for how, size in (("allgather", 1), ("hierarchical", 1))}
    paired = Simulation(spec, True, server, n=4, transport="hierarchical", local_size=2)
    differs = False
    for step in grads:
        flat, one = runs["allgather"].step(step), runs["hierarchical"].step(step)
        assert torch.equal(flat["w"], one["w"])
        differs |= not torch.equal(paired.step(step)["w"], flat["w"])
    assert differs


def test_hierarchical_is_refused_where_it_cannot_work():
    from hvd_compress.simulate import Simulation
    with pytest.raises(ValueError, match="local_size=3 does not divide the 4 ranks"):
        Simulation("topk:0.3", n=4, transport="hierarchical", local_size=3)
    with pytest.raises(ValueError, match="momentum correction with factor masking is not available with "
                                         "transport 'hierarchical'"):
        Simulation("topk:0.3", True, n=4, transport="hierarchical", local_size=2, momentum=0.9)
    # without the masking a node's velocity is its ranks' average velocity: each rank keeps its own
    Simulation("topk:0.3", True, n=4, transport="hierarchical", local_size=2, momentum=0.9, momentum_masking=False)
