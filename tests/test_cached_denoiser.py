"""CachedDenoiser: grid-cache reuse with CFG batches, row order, counting, and trajectory mode."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from hash3d_dg.cache import CacheKey, CachedDenoiser, Hash3DCache, Hash3DConfig, SplitDenoiser
from hash3d_dg.guidance.unet_split import UNetSplit


@pytest.fixture(scope="module")
def split():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8).eval().requires_grad_(False)
    return UNetSplit(unet, "last_subblock")


class Oracle:
    """A split model with a known answer: the feature depends only on the context row, so a
    feature cached for the same context is the exact one whatever the sample; the output mixes
    sample, timestep, context and feature row-wise (a row-order mistake changes it)."""

    def __init__(self):
        self.full_batches: list[int] = []
        self.shallow_batches: list[int] = []

    @staticmethod
    def feature_of(context: torch.Tensor) -> torch.Tensor:
        return context.mean(dim=1, keepdim=True).expand(-1, 3, -1) * 2.0  # [N, 3, D]

    def _out(self, sample, timestep, feature):
        t = torch.as_tensor(timestep, dtype=sample.dtype).reshape(-1, 1)
        return sample * 0.5 + feature.sum(dim=(1, 2)).reshape(-1, 1) + t * 0.001

    def full(self, sample, timestep, context):
        self.full_batches.append(sample.shape[0])
        feature = self.feature_of(context)
        return self._out(sample, timestep, feature), feature

    def shallow(self, sample, timestep, context, feature):
        self.shallow_batches.append(sample.shape[0])
        return self._out(sample, timestep, feature)


def paper_cache(eta=1.0, **kw) -> Hash3DCache:
    return Hash3DCache(Hash3DConfig.preset("paper", eta=eta, **kw), seed=0)


def _views(n_views, n_copies=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(n_copies * n_views, 8, 8, 8, generator=g)
    context = torch.randn(n_copies * n_views, 5, 32, generator=g)
    t = torch.randint(20, 980, (n_copies * n_views,), generator=g)
    return sample, t, context


def test_protocol():
    assert isinstance(Oracle(), SplitDenoiser)


def test_repeated_query_hits_and_matches_full_exactly(split):
    """eta=1: the first call misses (full + insert), the second is a hit whose blended feature is
    the exact stored feature, so the shallow output equals the full output."""
    den = CachedDenoiser(split, paper_cache())
    sample, _, context = _views(2)
    t = torch.tensor(500)
    keys = [CacheKey(30.0, 0.0, 2.0, 500.0), CacheKey(200.0, 10.0, 2.0, 500.0)]
    ref = split.unet(sample, t, context).sample
    first = den(sample, t, context, keys)
    assert den.stats.as_dict() == {"full_calls": 2, "shallow_calls": 0}
    second = den(sample, t, context, keys)
    assert den.stats.as_dict() == {"full_calls": 2, "shallow_calls": 2}
    assert den.last_shallow == [True, True]
    assert den.cache.stats.hits == 2 == den.stats.shallow_calls
    assert (first - ref).abs().max().item() < 1e-5
    assert (second - first).abs().max().item() < 1e-5


def test_cfg_rows_reassembled_in_order(split):
    """3 views x [cond; uncond]; views 0 and 2 hit, view 1 misses; per-row timesteps/contexts."""
    cache = paper_cache()
    den = CachedDenoiser(split, cache)
    sample, t, context = _views(3, seed=3)
    keys = [CacheKey(10.0, 0.0, 2.0, 300.0), CacheKey(100.0, 0.0, 2.0, 300.0), CacheKey(250.0, 0.0, 2.0, 300.0)]
    den(sample, t, context, keys)
    assert cache.stats.entries == 3
    new_keys = [keys[0], CacheKey(170.0, -40.0, 2.0, 900.0), keys[2]]
    out = den(sample, t, context, new_keys)
    assert den.last_shallow == [True, False, True]
    ref = split.unet(sample, t, context).sample
    assert (out - ref).abs().max().item() < 1e-5
    assert den.stats.full_calls == 4 and den.stats.shallow_calls == 2 == cache.stats.hits
    # one entry per view holds the feature rows of both copies
    assert all(e.feature.shape[0] == 2 for e in cache.entries())


def test_order_and_counts_with_random_hits():
    oracle = Oracle()
    cache = paper_cache(eta=0.5, grids=[[60, 60, 1.0, 1000]], adaptive=False)
    den = CachedDenoiser(oracle, cache)
    g = torch.Generator().manual_seed(7)
    contexts = {v: torch.randn(2, 4, 6, generator=g) for v in range(4)}  # per view: [cond, uncond]
    cell_of_view = {0: 10.0, 1: 70.0, 2: 130.0, 3: 190.0}  # one cell per view
    total_views = 0
    for _ in range(12):
        views = torch.randperm(4, generator=g)[: int(torch.randint(1, 5, (1,), generator=g))].tolist()
        b = len(views)
        sample = torch.randn(2 * b, 3, generator=g)
        t = torch.randint(0, 1000, (2 * b,), generator=g).float()
        context = torch.cat([torch.stack([contexts[v][c] for v in views]) for c in range(2)])
        keys = [CacheKey(cell_of_view[v], 0.0, 2.0, 500.0) for v in views]
        n_full_calls = len(oracle.full_batches)
        n_shallow_calls = len(oracle.shallow_batches)
        out = den(sample, t, context, keys, query=torch.zeros(b, 2))
        expected, _ = Oracle().full(sample, t, context)
        assert torch.allclose(out, expected, atol=1e-5)
        assert len(oracle.full_batches) - n_full_calls <= 1 and len(oracle.shallow_batches) - n_shallow_calls <= 1
        total_views += b
    s = den.stats
    assert s.full_calls + s.shallow_calls == total_views
    assert s.shallow_calls == cache.stats.hits > 0 and s.full_calls > 0
    assert sum(oracle.shallow_batches) == 2 * s.shallow_calls and sum(oracle.full_batches) == 2 * s.full_calls


def test_query_default_and_explicit():
    oracle = Oracle()
    sample = torch.randn(4, 3)
    context = torch.randn(4, 2, 5)
    keys = [CacheKey(0.0, 0.0, 2.0, 10.0), CacheKey(90.0, 0.0, 2.0, 10.0)]
    cache = paper_cache()
    CachedDenoiser(oracle, cache)(sample, 5, context, keys)
    e0, e1 = cache.entries()
    assert torch.equal(e0.query, sample[0::2]) and torch.equal(e1.query, sample[1::2])
    cache2 = paper_cache()
    query = torch.randn(2, 7)
    CachedDenoiser(oracle, cache2)(sample, 5, context, keys, query=query)
    assert torch.equal(cache2.entries()[1].query, query[1])
    with pytest.raises(ValueError, match="query"):
        CachedDenoiser(oracle, cache2)(sample, 5, context, keys, query=torch.zeros(3, 7))
    with pytest.raises(ValueError, match="views"):
        CachedDenoiser(oracle, cache2)(torch.randn(5, 3), 5, torch.randn(5, 2, 5), keys)


def test_features_stored_detached_and_grad_flows(split):
    cache = paper_cache()
    den = CachedDenoiser(split, cache)
    sample, t, context = _views(1)
    keys = [CacheKey(0.0, 0.0, 2.0, 400.0)]
    x = sample.clone().requires_grad_(True)
    den(x, t, context, keys).sum().backward()
    assert not cache.entries()[0].feature.requires_grad
    x2 = sample.clone().requires_grad_(True)
    out = den(x2, t, context, keys)
    assert den.last_shallow == [True]
    out.sum().backward()
    assert x2.grad is not None and x2.grad.abs().sum() > 0


def test_without_cache_or_keys_everything_is_full():
    oracle = Oracle()
    den = CachedDenoiser(oracle, None)
    sample, context = torch.randn(6, 3), torch.randn(6, 2, 4)
    keys = [CacheKey(0.0, 0.0, 2.0, 1.0)] * 3
    assert torch.equal(den(sample, 1, context, keys), oracle.full(sample, 1, context)[0])
    assert den.stats.full_calls == 3 and den.stats.shallow_calls == 0
    den2 = CachedDenoiser(oracle, paper_cache())
    den2(sample, 1, context)  # no keys: no caching, one view
    assert den2.stats.full_calls == 1 and den2.cache.stats.inserts == 0
    den2.reset_stats()
    assert den2.stats.full_calls == 0


def test_eta_zero_never_retrieves():
    oracle = Oracle()
    cache = paper_cache(eta=0.0)
    den = CachedDenoiser(oracle, cache)
    sample, context = torch.randn(2, 3), torch.randn(2, 2, 4)
    for _ in range(3):
        den(sample, 1, context, [CacheKey(0.0, 0.0, 2.0, 1.0)])
    assert cache.stats.attempts == 0 and cache.stats.inserts == 3 and den.stats.full_calls == 3


def test_trajectory_mode_full_every_interval():
    oracle = Oracle()
    cache = paper_cache()
    den = CachedDenoiser(oracle, cache)
    g = torch.Generator().manual_seed(0)
    keys = [CacheKey(0.0, 0.0, 2.0, 1.0), CacheKey(90.0, 0.0, 2.0, 1.0)]
    served, kept = [], None
    with den.trajectory(interval=3):
        for step in range(7):
            sample, context = torch.randn(4, 3, generator=g), torch.randn(4, 2, 4, generator=g)
            out = den(sample, 900 - 100 * step, context, keys)
            served.append(den.last_shallow[0])
            if step % 3 == 0:
                ref, kept = oracle.full(sample, 900 - 100 * step, context)
            else:
                ref = oracle.shallow(sample, 900 - 100 * step, context, kept)
            assert torch.allclose(out, ref)
    assert served == [False, True, True, False, True, True, False]
    assert den.stats.full_calls == 3 * 2 and den.stats.shallow_calls == 4 * 2
    assert cache.stats.attempts == 0 and cache.stats.inserts == 0  # grid cache unused


def test_trajectory_restarts_on_new_shape_and_defaults():
    oracle = Oracle()
    den = CachedDenoiser(oracle, Hash3DCache(Hash3DConfig.preset("official", trajectory_interval=4)))
    assert den.trajectory_interval == 4
    assert CachedDenoiser(oracle).trajectory_interval == 20
    with den.trajectory():
        den(torch.randn(2, 3), 1, torch.randn(2, 2, 4))
        den(torch.randn(2, 3), 1, torch.randn(2, 2, 4))
        assert den.last_shallow == [True]
        den(torch.randn(4, 3), 1, torch.randn(4, 2, 4))  # new batch shape: full again
        assert den.last_shallow == [False]
        with pytest.raises(RuntimeError, match="nested"):
            with den.trajectory():
                pass
    den(torch.randn(2, 3), 1, torch.randn(2, 2, 4))  # outside: plain full call
    assert den.last_shallow == [False]


def test_no_reuse_and_refine_reuse_per_stage2_setting():
    oracle = Oracle()
    cache = paper_cache()
    den = CachedDenoiser(oracle, cache)
    keys = [CacheKey(0.0, 0.0, 2.0, 1.0)]
    sample, context = torch.randn(2, 3), torch.randn(2, 2, 4)
    den(sample, 1, context, keys)  # a miss, then stored
    assert cache.stats.attempts == 1 and cache.stats.inserts == 1
    with den.refine_reuse("none"):
        for _ in range(3):
            out = den(sample, 1, context, keys)
            assert torch.allclose(out, oracle.full(sample, 1, context)[0])
    assert den.stats.full_calls == 4 and den.stats.shallow_calls == 0
    assert cache.stats.attempts == 1 and cache.stats.inserts == 1  # neither read nor written
    with den.refine_reuse("trajectory", 5):
        den(sample, 1, context, keys)
        den(sample, 1, context, keys)
        assert den.last_shallow == [True]
    with den.refine_reuse("cache"):
        den(sample, 1, context, keys)
    assert cache.stats.attempts == 2 and cache.stats.hits == 1
    with pytest.raises(ValueError, match="stage-2 reuse"):
        den.refine_reuse("sometimes")
    plain = CachedDenoiser(oracle)  # mode off: every setting is a plain context
    with plain.refine_reuse("trajectory"):
        plain(sample, 1, context, keys)
        plain(sample, 1, context, keys)
    assert plain.stats.shallow_calls == 0
