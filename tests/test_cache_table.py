"""Hash3D table: config presets, grid hashing (Eq. 5), buckets/queues, Eq. 6 blending, adaptive grid
choice (Eq. 7-8), memory budget and statistics."""

import math

import pytest
import torch

from hash3d_dg.cache import CacheKey, GridSpec, Hash3DCache, Hash3DConfig, bucket_index, make_cache
from hash3d_dg.cache.blend import blend_features, blend_weights, query_distances


def cfg(**kw) -> Hash3DConfig:
    base = dict(grids=[[10, 10, 0.1, 10]], adaptive=False, eta=1.0)
    base.update(kw)
    return Hash3DConfig.preset("paper", **base)


def key(az=0.0, el=0.0, r=2.0, t=500.0) -> CacheKey:
    return CacheKey(az, el, r, t)


def const(value: float, shape=(2, 3)) -> torch.Tensor:
    return torch.full(shape, float(value))


# -- config -------------------------------------------------------------------------------------

def test_presets():
    off = Hash3DConfig.preset("off")
    assert off.mode == "off" and not off.enabled
    paper = Hash3DConfig.preset("paper")
    assert paper.grids == [[10, 10, 0.1, 10], [20, 20, 0.15, 20], [30, 30, 0.2, 30]]
    assert paper.adaptive and paper.eta == 0.1 and paper.distance == "squared" and paper.stage2 == "cache"
    assert Hash3DConfig() == paper
    official = Hash3DConfig.preset("official")
    assert official.grids == [[20, 20, 0.1, 20]] and not official.adaptive
    assert official.eta == 0.5 and official.distance == "l2"
    # The public code's refine passes no cache layer: every stage-2 step is a full call.
    assert official.stage2 == "none"
    # The paper's point (DeepCache's (0, 0)) in every cached mode.
    assert paper.cache_point == official.cache_point == "paper" and paper.split_point() == (-1, 1)
    assert Hash3DConfig.preset("official", eta=0.2).eta == 0.2
    assert Hash3DConfig.preset("official", stage2="trajectory").stage2 == "trajectory"
    fast = Hash3DConfig.preset("fast")
    assert fast.timestep_fallback > 0 and fast.stage2 == "trajectory" and fast.adaptive
    assert fast.eta > paper.eta


def test_cache_point_names_and_pairs():
    from hash3d_dg.cache.config import resolve_cache_point

    assert resolve_cache_point("paper") == (-1, 1)
    assert resolve_cache_point("last_subblock") == (-1, -1)
    assert resolve_cache_point("last_block") == (-1, 0)
    assert Hash3DConfig.preset("paper", cache_point=[-1, 2]).split_point() == (-1, 2)
    assert Hash3DConfig.preset("paper", cache_point=(0, 1)).cache_point == [0, 1]


@pytest.mark.parametrize("overrides, match", [
    (dict(eta=1.5), "eta"),
    (dict(eta=-0.1), "eta"),
    (dict(grids=[[10, 0, 0.1, 10]]), "grids"),
    (dict(grids=[[10, 10, 0.1]]), "grids"),
    (dict(grids=[]), "grids"),
    (dict(distance="cosine"), "distance"),
    (dict(queue_size=0), "queue_size"),
    (dict(table_size=0), "table_size"),
    (dict(primes=[3, 5]), "primes"),
    (dict(gamma=1.0), "gamma"),
    (dict(memory_budget_bytes=0), "memory_budget_bytes"),
    (dict(cache_point="middle"), "cache_point"),
    (dict(cache_point=[1]), "cache_point"),
    (dict(cache_point=[1, 0.5]), "cache_point"),
    (dict(cache_point=[True, 1]), "cache_point"),
    (dict(timestep_fallback=-1), "timestep_fallback"),
    (dict(timestep_fallback=1.5), "timestep_fallback"),
    (dict(camera_gate_deg=0), "camera_gate_deg"),
    (dict(camera_gate_deg=200), "camera_gate_deg"),
    (dict(stage2="both"), "stage2"),
    (dict(trajectory_interval=0), "trajectory_interval"),
    (dict(store_dtype="int8"), "store_dtype"),
    (dict(colour="red"), "unknown Hash3D setting"),
])
def test_invalid_values_raise_one_line(overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        Hash3DConfig.preset("paper", **overrides)
    assert "\n" not in str(info.value)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown Hash3D mode 'fastest'") as info:
        Hash3DConfig.preset("fastest")
    assert "\n" not in str(info.value)


def test_off_mode_has_no_cache():
    assert make_cache(Hash3DConfig.preset("off")) is None
    with pytest.raises(ValueError, match="off"):
        Hash3DCache(Hash3DConfig.preset("off"))
    assert isinstance(make_cache(Hash3DConfig.preset("paper")), Hash3DCache)


# -- grid hashing --------------------------------------------------------------------------------

def test_cell_each_delta_on_its_own_coordinate():
    grid = GridSpec(10, 20, 0.1, 30)
    assert grid.cell(CacheKey(25.0, -15.0, 2.0, 980.0)) == (2, -1, 20, 32)
    assert GridSpec(20, 20, 0.1, 20).cell(CacheKey(45.0, 30.0, 1.55, 399.0)) == (2, 1, 15, 19)


def test_azimuth_wraps_at_360():
    grid = GridSpec(10, 10, 0.1, 10)
    assert grid.cell(key(az=359.9)) == grid.cell(key(az=-0.1))
    assert grid.cell(key(az=359.9))[0] == 35
    assert grid.cell(key(az=360.0)) == grid.cell(key(az=0.0)) == grid.cell(key(az=-360.0))
    assert grid.cell(key(az=725.0)) == grid.cell(key(az=5.0))
    assert grid.cell(key(az=-1e-20))[0] == 0  # -1e-20 + 360 rounds to 360 == 0 degrees
    assert grid.cell(key(az=-0.1)) != grid.cell(key(az=0.1))


def test_bucket_index_is_eq5():
    assert bucket_index((1, 2, 3, 4), (5, 7, 11), 13) == (1 + 5 * 2 + 7 * 3 + 11 * 4) % 13
    assert 0 <= bucket_index((-3, -2, -1, 0), (73856093, 19349663, 83492791), 1024) < 1024


def test_identical_keys_same_bucket():
    cache = Hash3DCache(Hash3DConfig.preset("paper"))
    for table in cache.tables:
        assert table.locate(key(30.0, 10.0, 2.0, 500.0)) == table.locate(key(30.0 + 360.0, 10.0, 2.0, 500.0))
        assert table.locate(key(12.0)) == table.locate(CacheKey(12.0, 0.0, 2.0, 500.0))


# -- queues and eviction ------------------------------------------------------------------------

def test_queue_bound_and_oldest_first_eviction():
    cache = Hash3DCache(cfg(queue_size=3))
    for n in range(5):
        cache.insert(key(az=1.0 + n), const(n), const(10 * n))  # all in cell i=0
    queue = cache.tables[0].queue(key(az=5.0))
    assert [e.seq for e in queue.entries] == [2, 3, 4]
    assert [float(e.feature[0, 0]) for e in queue.entries] == [20.0, 30.0, 40.0]
    s = cache.stats
    assert (s.inserts, s.evictions, s.entries) == (5, 2, 3)
    assert s.bytes == 3 * 2 * const(0).nbytes


def test_stored_tensors_are_independent_copies():
    cache = Hash3DCache(cfg())
    q, v = const(1.0), const(2.0)
    cache.insert(key(), q, v)
    q.add_(100.0)
    v.add_(100.0)
    out, _ = cache.retrieve(key(), const(1.0))
    assert torch.equal(out, const(2.0))


def test_store_dtype():
    cache = Hash3DCache(cfg(store_dtype="float16"))
    cache.insert(key(), const(0.0), const(1.5))
    out, _ = cache.retrieve(key(), const(0.0))
    assert out.dtype == torch.float16 and torch.equal(out.float(), const(1.5))
    assert cache.stats.bytes == const(0).nbytes + const(0).nbytes // 2


# -- Eq. 6 ----------------------------------------------------------------------------------------

def test_blend_weights_sum_to_one_and_match_reference():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(4, generator=g) * 0.3
    stored = torch.randn(5, 4, generator=g) * 0.3
    for distance in ("squared", "l2"):
        w = blend_weights(query, stored, distance)
        d2 = ((stored.double() - query.double()) ** 2).sum(1)
        d = d2 if distance == "squared" else d2.sqrt()
        ref = torch.exp(-d) / torch.exp(-d).sum()
        assert torch.allclose(w.double(), ref, atol=1e-6)
        assert abs(float(w.sum()) - 1.0) < 1e-6


def test_blend_is_stable_for_huge_distances():
    query = torch.zeros(4096)
    stored = torch.stack([torch.full((4096,), 50.0), torch.full((4096,), 60.0)])
    w = blend_weights(query, stored, "squared")
    assert torch.isfinite(w).all() and torch.equal(w, torch.tensor([1.0, 0.0]))


def test_retrieve_matches_eq6_by_hand():
    for distance in ("squared", "l2"):
        cache = Hash3DCache(cfg(distance=distance))
        q1, q2 = torch.tensor([0.0, 0.0]), torch.tensor([0.3, 0.4])
        v1, v2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, -2.0])
        cache.insert(key(az=1.0), q1, v1)
        cache.insert(key(az=2.0), q2, v2)
        query = torch.tensor([0.1, 0.1])
        d1, d2 = (0.01 + 0.01), (0.04 + 0.09)
        if distance == "l2":
            d1, d2 = math.sqrt(d1), math.sqrt(d2)
        w1 = math.exp(-d1) / (math.exp(-d1) + math.exp(-d2))
        out, grid = cache.retrieve(key(az=3.0), query)
        assert grid == 0
        assert torch.allclose(out, w1 * v1 + (1 - w1) * v2, atol=1e-6)


def test_nearest_dominates_and_identical_query_returns_its_feature():
    cache = Hash3DCache(cfg())
    g = torch.Generator().manual_seed(1)
    queries = [torch.randn(4, 8, 8, generator=g) for _ in range(3)]
    feats = [torch.randn(2, 16, 8, 8, generator=g) for _ in range(3)]
    for i in range(3):
        cache.insert(key(az=1.0 + i), queries[i], feats[i])
    for i in range(3):
        out, _ = cache.retrieve(key(az=4.0), queries[i])
        assert torch.equal(out, feats[i])  # the other weights underflow to exactly 0
    near = queries[1] + 0.01 * torch.randn(4, 8, 8, generator=g)
    w = blend_weights(near, torch.stack(queries))
    assert int(w.argmax()) == 1 and float(w[1]) > 0.99


def test_single_entry_blend_is_exact():
    feature = torch.randn(2, 5, 3, 3)
    out = blend_features(torch.randn(7), torch.randn(1, 7) + 5.0, feature[None])
    assert torch.equal(out, feature)


def test_query_distance_shapes_checked():
    with pytest.raises(ValueError, match="do not match"):
        query_distances(torch.zeros(3), torch.zeros(2, 4))


# -- collisions ----------------------------------------------------------------------------------

def test_colliding_cells_never_blend():
    cache = Hash3DCache(cfg(table_size=1))
    ka, kb = key(az=5.0), key(az=95.0)
    table = cache.tables[0]
    assert table.locate(ka)[0] == table.locate(kb)[0] == 0 and table.locate(ka)[1] != table.locate(kb)[1]
    cache.insert(ka, const(0.0), const(1.0))
    cache.insert(kb, const(7.0), const(-1.0))
    # The query equals B's stored query, but the key is in A's cell: only A's entry may answer.
    out, _ = cache.retrieve(ka, const(7.0))
    assert torch.equal(out, const(1.0))
    out, _ = cache.retrieve(kb, const(0.0))
    assert torch.equal(out, const(-1.0))
    assert cache.retrieve(key(az=185.0), const(0.0)) is None  # same bucket, empty cell: a miss
    assert len(table.buckets[0]) == 2


def test_collisions_with_real_primes():
    """Find two different cells with the same Eq. 5 index at n=8 and check they stay apart."""
    c = cfg(table_size=8)
    cache = Hash3DCache(c)
    table = cache.tables[0]
    base = key(az=5.0, el=5.0, r=2.0, t=500.0)
    other = next(k for k in (key(az=5.0 + 10 * i, el=5.0 + 10 * j) for i in range(1, 36) for j in range(-5, 5))
                 if table.locate(k)[0] == table.locate(base)[0])
    cache.insert(base, const(0.0), const(3.0))
    cache.insert(other, const(0.0), const(4.0))
    assert torch.equal(cache.retrieve(base, const(0.0))[0], const(3.0))
    assert torch.equal(cache.retrieve(other, const(0.0))[0], const(4.0))


# -- memory budget -------------------------------------------------------------------------------

def test_memory_budget_holds_and_evicts_globally_oldest():
    entry_bytes = 2 * const(0).nbytes
    c = Hash3DConfig.preset("paper", eta=1.0, memory_budget_bytes=5 * entry_bytes)
    cache = Hash3DCache(c)
    for n in range(40):
        cache.insert(key(az=(n * 37) % 360, el=(n % 7) * 10.0), const(n), const(n))
        assert cache.stats.bytes <= c.memory_budget_bytes
        assert cache.stats.bytes == sum(e.nbytes for e in cache.entries())
    assert [e.seq for e in cache.entries()] == list(range(35, 40))
    s = cache.stats
    assert s.entries == 5 and s.inserts - s.evictions == s.entries and s.budget_evictions == 35
    held = {id(e) for t in cache.tables for _, _, q in t.cells() for e in q.entries}
    assert held == {id(e) for e in cache.entries()}  # evicted entries left every grid


def test_oversized_entry_rejected():
    cache = Hash3DCache(cfg(memory_budget_bytes=100))
    cache.insert(key(), torch.zeros(10), torch.zeros(100))
    assert cache.stats.rejected == 1 and cache.stats.entries == 0 and cache.stats.inserts == 0


# -- adaptive grid (Eq. 7-8) -----------------------------------------------------------------------

def test_entries_shared_between_grids():
    cache = Hash3DCache(Hash3DConfig.preset("paper", eta=1.0))
    cache.insert(key(az=3.0), const(0.0), const(1.0))
    entries = [t.queue(key(az=3.0)).entries[0] for t in cache.tables]
    assert all(e is entries[0] for e in entries) and entries[0].grids == {0, 1, 2}
    assert cache.stats.entries == 1 and cache.stats.bytes == 2 * const(0).nbytes


def test_adaptive_picks_highest_similarity():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    c = Hash3DConfig.preset("paper", eta=1.0, gamma=0.5, grids=[[10, 10, 0.1, 10], [30, 30, 0.1, 10]])
    cache = Hash3DCache(c)
    q = torch.zeros(3)
    cache.insert(key(az=5.0), q, a)
    cache.insert(key(az=6.0), q, -a)  # both grids: s = cos(-a, a) = -1
    assert cache.similarity(key(az=5.0)) == [-1.0, -1.0]
    for _ in range(3):  # az 25 lies in the coarse cell only
        cache.insert(key(az=25.0), q, b)
    # coarse queue evolution (Q=3, gamma 0.5): [a,-a]+b: mean 0 -> s=-0.5;
    # [a,-a,b]+b: mean 1/3 -> s=-1/12; [-a,b,b]+b: mean 2/3 -> s=7/24.
    fine, coarse = cache.similarity(key(az=5.0))
    assert fine == -1.0 and coarse == pytest.approx(7 / 24)
    out, grid = cache.retrieve(key(az=5.0), q)
    assert grid == 1
    assert torch.allclose(out, b)  # the coarse queue now holds [b, b, b]
    assert cache.stats.hits_by_grid == [0, 1]

    # Now make the fine cell the most consistent one: it sees only a, the coarse one a and -a.
    for _ in range(6):
        cache.insert(key(az=5.0), q, a)
        cache.insert(key(az=25.0), q, -a)
    fine, coarse = cache.similarity(key(az=5.0))
    assert fine == pytest.approx(0.890625)  # -1 -> -1/2 -> -1/12 -> 1/8 -> 9/16 -> 25/32 -> 57/64
    assert coarse < 0 < fine
    out, grid = cache.retrieve(key(az=5.0), q)
    assert grid == 0 and torch.allclose(out, a)


def test_adaptive_uses_only_nonempty_grids_and_unmeasured_rank_last():
    c = Hash3DConfig.preset("paper", eta=1.0, grids=[[10, 10, 0.1, 10], [30, 30, 0.1, 10]])
    cache = Hash3DCache(c)
    q = torch.zeros(3)
    cache.insert(key(az=25.0), q, const(1.0))
    # the fine cell of az=5 is empty; the coarse cell holds one (unmeasured) entry
    assert cache.retrieve(key(az=5.0), q)[1] == 1
    cache.insert(key(az=5.0), q, const(2.0))
    # fine: one entry, never measured; coarse: measured -> coarse wins
    assert cache.similarity(key(az=5.0))[0] is None
    assert cache.retrieve(key(az=5.0), q)[1] == 1


def test_non_adaptive_uses_first_grid_only():
    cache = Hash3DCache(Hash3DConfig.preset("paper", eta=1.0, adaptive=False))
    assert len(cache.tables) == 1 and cache.tables[0].spec == GridSpec(10, 10, 0.1, 10)
    cache.insert(key(az=5.0), const(0.0), const(1.0))
    assert cache.retrieve(key(az=15.0), const(0.0)) is None
    assert cache.similarity(key(az=5.0)) == [None]


# -- retrieval probability and stats ---------------------------------------------------------------

def test_should_retrieve_is_seeded_bernoulli():
    assert not any(Hash3DCache(cfg(eta=0.0)).should_retrieve() for _ in range(200))
    assert all(Hash3DCache(cfg(eta=1.0)).should_retrieve() for _ in range(200))
    c1, c2 = Hash3DCache(cfg(eta=0.3), seed=5), Hash3DCache(cfg(eta=0.3), seed=5)
    draws = [c1.should_retrieve() for _ in range(4000)]
    assert draws == [c2.should_retrieve() for _ in range(4000)]
    # 4000 draws: mean 1200, sd ~29; 10 sd margin
    assert 900 < sum(draws) < 1500


def test_stats_consistent_and_clear():
    cache = Hash3DCache(Hash3DConfig.preset("paper", eta=1.0, queue_size=2))
    for n in range(12):
        cache.insert(key(az=n * 4.0, t=500.0 + n), const(n), const(n))
        cache.retrieve(key(az=n * 7.0, t=500.0), const(0.0))
    s = cache.stats
    assert s.attempts == 12 and s.hits + s.misses == s.attempts and sum(s.hits_by_grid) == s.hits
    assert s.entries == s.inserts - s.evictions == len(cache.entries())
    d = s.as_dict()
    assert d["hits"] == s.hits and d["hits_by_grid"] == s.hits_by_grid and 0 <= d["hit_rate"] <= 1
    cache.clear(reset_stats=False)
    assert cache.stats.entries == 0 and cache.stats.bytes == 0
    assert cache.stats.evictions == cache.stats.inserts  # every insert has left
    assert cache.retrieve(key(), const(0.0)) is None
    cache.clear()
    assert cache.stats.as_dict()["inserts"] == 0 and cache.stats.hits_by_grid == [0, 0, 0]


# -- retrieval policies beyond the paper ---------------------------------------------------------

def test_timestep_fallback_serves_the_nearest_timestep_cell_of_the_same_camera_cell():
    plain = Hash3DCache(cfg())
    cache = Hash3DCache(cfg(timestep_fallback=2))
    for c in (plain, cache):
        c.insert(key(az=5.0, t=515.0), const(0), const(1))   # timestep cell 51: one away
        c.insert(key(az=5.0, t=535.0), const(0), const(3))   # cell 53: three away
        c.insert(key(az=25.0, t=505.0), const(0), const(7))  # own timestep cell, other camera cell
    query = key(az=3.0, t=501.0)  # cell (0, 0, 20, 50): empty
    assert plain.retrieve(query, const(0)) is None
    got = cache.retrieve(query, const(0))
    assert got is not None and torch.equal(got[0], const(1))
    assert cache.stats.hits == cache.stats.fallback_hits == 1
    # l - d is searched before l + d
    cache.insert(key(az=5.0, t=495.0), const(0), const(2))  # cell 49
    assert torch.equal(cache.retrieve(query, const(0))[0], const(2))
    # never farther than timestep_fallback cells, never another camera cell
    far = Hash3DCache(cfg(timestep_fallback=2))
    far.insert(key(az=5.0, t=535.0), const(0), const(3))
    far.insert(key(az=15.0, t=501.0), const(0), const(4))
    assert far.retrieve(query, const(0)) is None
    # the own cell always wins over a fall-back
    cache.insert(key(az=8.0, t=507.0), const(0), const(5))
    assert torch.equal(cache.retrieve(query, const(0))[0], const(5))
    assert cache.stats.fallback_hits == 2


def test_camera_gate_drops_far_entries_of_a_cell():
    cache = Hash3DCache(cfg(grids=[[30, 30, 0.1, 10]], camera_gate_deg=10.0))
    cache.insert(key(az=1.0, el=1.0), torch.zeros(2, 3), const(1))
    cache.insert(key(az=28.0, el=1.0), torch.zeros(2, 3), const(9))
    got = cache.retrieve(key(az=4.0, el=2.0), torch.zeros(2, 3))
    assert got is not None and torch.equal(got[0], const(1))  # the 27-degree neighbour is out
    assert cache.retrieve(key(az=15.0, el=15.0), torch.zeros(2, 3)) is None  # both too far
    assert cache.stats.gated == 1 and cache.stats.misses == 1
    ungated = Hash3DCache(cfg(grids=[[30, 30, 0.1, 10]]))
    ungated.insert(key(az=28.0, el=1.0), torch.zeros(2, 3), const(9))
    assert ungated.retrieve(key(az=15.0, el=15.0), torch.zeros(2, 3)) is not None


def test_view_angle():
    from hash3d_dg.cache.table import view_angle_deg

    assert view_angle_deg(key(az=10.0), key(az=30.0)) == pytest.approx(20.0)
    assert view_angle_deg(key(az=355.0), key(az=5.0)) == pytest.approx(10.0)
    assert view_angle_deg(key(el=80.0, az=0.0), key(el=80.0, az=180.0)) == pytest.approx(20.0)


def test_run_config_accepts_cache_point_pairs_and_new_settings():
    from hash3d_dg.config import build_config
    from hash3d_dg.errors import ConfigError

    cfg = build_config({"hash3d": {"mode": "paper"}},
                       ["hash3d.cache_point=[-1, 2]", "hash3d.timestep_fallback=2", "hash3d.stage2=none",
                        "hash3d.camera_gate_deg=12"])
    assert cfg.hash3d.split_point() == (-1, 2) and cfg.hash3d.timestep_fallback == 2
    assert cfg.hash3d.stage2 == "none" and cfg.hash3d.camera_gate_deg == 12.0
    fast = build_config({"hash3d": {"mode": "fast"}}).hash3d
    assert fast.camera_gate_deg is not None and fast.cache_point == "last_subblock"
    with pytest.raises(ConfigError, match="cache_point"):
        build_config({}, ["hash3d.mode=paper", "hash3d.cache_point=middle"])
