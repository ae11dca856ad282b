"""The adaptive grid and the hashing, checked against the paper's equations worked by hand.

* Eq. 8's running similarity with an asymmetric momentum (gamma = 0.9, where gamma and
  1 - gamma give different values), the first measurement initialising it;
* the choice between grids: highest running similarity, an unmeasured cell below any measured
  one, ties to the earlier (finer) grid;
* Eq. 5's azimuth cells when the step does not divide 360: the short last column is its own
  column, and a wrapped azimuth lands in it.
"""

from __future__ import annotations

import math

import pytest
import torch

from hash3d_dg.cache import CacheKey, Hash3DCache, Hash3DConfig
from hash3d_dg.cache.grid import GridSpec, bucket_index


def unit(deg: float) -> torch.Tensor:
    """A 2-vector at ``deg`` degrees: cosines between them are known in closed form."""
    return torch.tensor([math.cos(math.radians(deg)), math.sin(math.radians(deg))],
                        dtype=torch.float64)


def key(az, el=0.0, r=2.0, t=500.0):
    return CacheKey(azimuth=az, elevation=el, radius=r, timestep=t)


def cache(grids, gamma=0.9, queue_size=4):
    return Hash3DCache(Hash3DConfig.preset("paper", eta=1.0, gamma=gamma, queue_size=queue_size,
                                           grids=grids))


Q = torch.zeros(3)  # every retrieval query; blending is not under test here


# ------------------------------------------------------------------ Eq. 8

def test_running_similarity_is_eq8_with_asymmetric_gamma():
    c = cache([[10, 10, 0.1, 10]], gamma=0.9, queue_size=4)
    k = key(3.0)
    c.insert(k, Q, unit(0))
    assert c.similarity(k) == [None]  # nothing to compare with yet
    c.insert(k, Q, unit(60))
    s = math.cos(math.radians(60))  # first measurement: s = mean cos = 0.5
    assert c.similarity(k)[0] == pytest.approx(s, abs=1e-12)
    c.insert(k, Q, unit(90))
    m = (math.cos(math.radians(90)) + math.cos(math.radians(30))) / 2
    s = 0.9 * s + 0.1 * m  # s <- gamma s + (1 - gamma) mean_i cos(v_new, v_i)
    assert c.similarity(k)[0] == pytest.approx(s, abs=1e-12)
    c.insert(k, Q, unit(180))
    m = (math.cos(math.radians(180)) + math.cos(math.radians(120))
         + math.cos(math.radians(90))) / 3
    s = 0.9 * s + 0.1 * m
    assert c.similarity(k)[0] == pytest.approx(s, abs=1e-12)
    # the queue is full (Q = 4): the next insert compares with the 4 held, then drops the oldest
    c.insert(k, Q, unit(45))
    m = sum(math.cos(math.radians(45 - a)) for a in (0, 60, 90, 180)) / 4
    s = 0.9 * s + 0.1 * m
    assert c.similarity(k)[0] == pytest.approx(s, abs=1e-12)
    # swapping gamma and 1 - gamma would give a clearly different value
    swapped = 0.1 * 0.5 + 0.9 * ((0 + math.cos(math.radians(30))) / 2)
    assert abs(swapped - (0.9 * 0.5 + 0.1 * ((0 + math.cos(math.radians(30))) / 2))) > 0.05


def test_similarity_is_tracked_per_grid_cell():
    c = cache([[10, 10, 0.1, 10], [40, 10, 0.1, 10]], gamma=0.9)
    c.insert(key(5.0), Q, unit(0))
    c.insert(key(25.0), Q, unit(90))  # another fine cell, the same coarse cell
    assert c.similarity(key(5.0)) == [None, pytest.approx(0.0, abs=1e-12)]
    assert c.similarity(key(25.0)) == [None, pytest.approx(0.0, abs=1e-12)]
    c.insert(key(6.0), Q, unit(60))
    fine = math.cos(math.radians(60))
    coarse = 0.9 * 0.0 + 0.1 * (math.cos(math.radians(60)) + math.cos(math.radians(30))) / 2
    assert c.similarity(key(5.0)) == [pytest.approx(fine), pytest.approx(coarse)]


# ------------------------------------------------------------------ choice between grids

def test_the_grid_with_the_higher_running_similarity_serves():
    c = cache([[10, 10, 0.1, 10], [40, 10, 0.1, 10]], gamma=0.9)
    c.insert(key(5.0), Q, unit(0))
    c.insert(key(25.0), Q, unit(0))   # coarse cell only: cos 1
    c.insert(key(6.0), Q, unit(80))   # fine: cos 80 deg; coarse: 0.9*1 + 0.1*cos80
    fine, coarse = c.similarity(key(5.0))
    assert coarse > fine
    _, grid = c.retrieve(key(5.0), Q)
    assert grid == 1 and c.stats.hits_by_grid == [0, 1]


def test_a_finer_grid_with_higher_similarity_wins():
    c = cache([[10, 10, 0.1, 10], [40, 10, 0.1, 10]], gamma=0.9)
    c.insert(key(5.0), Q, unit(0))
    c.insert(key(25.0), Q, unit(170))  # coarse only: cos -0.98
    c.insert(key(6.0), Q, unit(10))    # fine: cos 10 deg
    fine, coarse = c.similarity(key(5.0))
    assert fine > coarse
    assert c.retrieve(key(5.0), Q)[1] == 0


def test_ties_go_to_the_earlier_finer_grid():
    # the same entries in both grids' cells: equal similarity in every grid
    for order in ([[10, 10, 0.1, 10], [20, 20, 0.2, 20]], [[20, 20, 0.2, 20], [10, 10, 0.1, 10]]):
        c = cache(order, gamma=0.9)
        c.insert(key(5.0), Q, unit(0))
        c.insert(key(6.0), Q, unit(30))
        a, b = c.similarity(key(5.0))
        assert a == b
        assert c.retrieve(key(5.0), Q)[1] == 0
    # unmeasured cells in every grid (one entry each): also the first grid
    c = cache([[10, 10, 0.1, 10], [20, 20, 0.2, 20], [30, 30, 0.3, 30]])
    c.insert(key(5.0), Q, unit(0))
    assert c.similarity(key(5.0)) == [None, None, None]
    assert c.retrieve(key(5.0), Q)[1] == 0


def test_a_measured_cell_beats_an_unmeasured_one_even_with_negative_similarity():
    c = cache([[10, 10, 0.1, 10], [40, 10, 0.1, 10]], gamma=0.9)
    c.insert(key(25.0), Q, unit(0))
    c.insert(key(5.0), Q, unit(180))  # coarse cell: cos -1; fine cell: one entry, unmeasured
    fine, coarse = c.similarity(key(5.0))
    assert fine is None and coarse == pytest.approx(-1.0)
    assert c.retrieve(key(5.0), Q)[1] == 1


# ------------------------------------------------------------------ Eq. 5 azimuth cells

@pytest.mark.parametrize("d_az,cells", [(50.0, 8), (100.0, 4), (360.0, 1), (45.0, 8), (7.0, 52)])
def test_azimuth_columns_including_the_short_last_one(d_az, cells):
    spec = GridSpec(d_az, 10.0, 0.1, 10.0)
    assert spec.n_azimuth_cells == cells == math.ceil(360.0 / d_az)
    for az in [0.0, 0.5 * d_az, d_az, 123.4, 200.0, 299.9, 330.0, 355.0, 359.999]:
        # by hand: column floor(az / d_az), the last (possibly short) column being its own
        column = int((az % 360.0) // d_az)
        assert spec.cell(key(az))[0] == column, az
        # the same direction written with a negative angle or an extra turn
        assert spec.cell(key(az - 360.0))[0] == column, az
        assert spec.cell(key(az + 720.0))[0] == column, az
    assert spec.cell(key(360.0))[0] == 0


def test_short_last_column_is_not_folded_into_column_zero():
    spec = GridSpec(50.0, 10.0, 0.1, 10.0)
    assert spec.cell(key(355.0))[0] == 7 != spec.cell(key(5.0))[0]
    assert spec.cell(key(-5.0))[0] == 7
    # and the cache keeps them apart: an entry at 355 deg does not serve a query at 5 deg
    c = cache([[50, 10, 0.1, 10]])
    c.insert(key(355.0), Q, unit(0))
    assert c.retrieve(key(5.0), Q) is None
    assert c.retrieve(key(-1.0), Q) is not None


def test_cells_and_buckets_by_hand():
    spec = GridSpec(20.0, 15.0, 0.25, 30.0)
    k = CacheKey(azimuth=-30.0, elevation=-20.0, radius=2.3, timestep=95.0)
    # az -30 -> 330 -> column 16; el floor(-20/15) = -2; r floor(2.3/0.25) = 9; t floor(95/30) = 3
    assert spec.cell(k) == (16, -2, 9, 3)
    primes = [73856093, 19349663, 83492791]
    expected = (16 + 73856093 * -2 + 19349663 * 9 + 83492791 * 3) % 1024
    assert bucket_index((16, -2, 9, 3), primes, 1024) == expected
    assert 0 <= expected < 1024
    # an exact multiple starts its own cell (2.0 / 0.1 in floating point is 19.999...)
    assert GridSpec(20.0, 20.0, 0.1, 20.0).cell(CacheKey(0.0, 0.0, 2.0, 40.0))[2:] == (20, 2)


# ------------------------------------------------------------------ choice, gate and fall-back flags

def one(value: float, shape=(3,)) -> torch.Tensor:
    return torch.full(shape, float(value))


def single(**overrides):
    return Hash3DCache(Hash3DConfig.preset("paper", eta=1.0, grids=[[10, 10, 0.1, 10]],
                                           adaptive=False, **overrides))


def test_choose_grid_and_choose_flags():
    c = cache([[10, 10, 0.1, 10], [40, 10, 0.1, 10]])
    assert c.choose(key(5.0), Q) is None and c.choose_grid(key(5.0), Q) is None
    c.insert(key(5.0), Q, unit(0))
    m, entries = c.choose_grid(key(5.0), Q)
    assert m == 0 and [e.seq for e in entries] == [0]
    chosen = c.choose(key(5.0), Q)
    assert chosen[0] == 0 and chosen[2] is False and chosen[3] is False
    c.insert(key(25.0), Q, unit(0))  # coarse cell only
    m, entries = c.choose_grid(key(25.0), Q)
    assert m == 1 and sorted(e.seq for e in entries) == [0, 1]
    assert c.choose_grid(key(25.0), torch.zeros(4)) is None  # no entry of that query shape


def test_a_grid_whose_entries_do_not_match_does_not_hide_the_next_grid():
    c = cache([[10, 10, 0.1, 10], [40, 10, 0.1, 10]])
    c.insert(key(5.0), torch.zeros(4), unit(0))  # fine + coarse cells, another query shape
    c.insert(key(25.0), Q, unit(90))             # coarse cell only, the query's shape
    got = c.retrieve(key(5.0), Q)
    assert got is not None and got[1] == 1
    torch.testing.assert_close(got[0], unit(90))


def test_plain_misses_are_not_counted_as_gated():
    c = single()
    assert c.retrieve(key(5.0), Q) is None
    c.insert(key(5.0), torch.zeros(4), unit(0))  # only another query shape in the cell
    assert c.retrieve(key(5.0), Q) is None
    assert c.stats.misses == 2 and c.stats.gated == 0
    assert c.similarity(key(55.0)) == [None]  # an empty cell


def test_gated_misses_count_each_time_and_choose_says_so():
    c = single(camera_gate_deg=3.0)
    c.insert(key(9.0), Q, unit(0))
    assert c.choose(key(1.0), Q) == (-1, [], False, True)
    assert c.choose_grid(key(1.0), Q) is None
    assert c.retrieve(key(1.0), Q) is None and c.retrieve(key(1.5), Q) is None
    assert c.stats.gated == 2 and c.stats.misses == 2


def test_fallback_two_cells_away_and_with_the_camera_gate():
    c = single(timestep_fallback=2, camera_gate_deg=5.0)
    c.insert(key(5.0, t=525.0), Q, one(2))   # timestep cell 52, query in 50: two away
    got = c.retrieve(key(3.0, t=501.0), Q)
    assert got is not None and torch.equal(got[0], one(2))
    assert c.choose(key(3.0, t=501.0), Q)[2] is True
    # the gate applies in the fall-back cells too: a far camera there is a gated miss
    g = single(timestep_fallback=1, camera_gate_deg=2.0)
    g.insert(key(9.0, t=515.0), Q, one(1))
    assert g.retrieve(key(1.0, t=501.0), Q) is None
    assert g.stats.gated == 1
    assert g.choose(key(1.0, t=501.0), Q) == (-1, [], False, True)


def test_budget_and_rejections_count_exactly():
    q, v = torch.zeros(4), torch.zeros(4)  # 16 + 16 bytes
    c = single(memory_budget_bytes=32)
    c.insert(key(5.0), q, v)  # exactly the budget: stored
    assert c.stats.entries == 1 and c.stats.rejected == 0
    small = single(memory_budget_bytes=31)
    small.insert(key(5.0), q, v)
    small.insert(key(6.0), q, v)
    assert small.stats.rejected == 2 and small.stats.entries == 0


def test_budget_eviction_leaves_no_empty_queues_or_buckets():
    q, v = torch.zeros(4), torch.zeros(4)
    c = Hash3DCache(Hash3DConfig.preset("paper", eta=1.0, memory_budget_bytes=64))
    for az in (5.0, 25.0, 45.0, 65.0):  # every insert past two evicts the globally oldest
        c.insert(key(az), q, v)
    assert c.stats.entries == 2 and c.stats.budget_evictions == 2
    for table in c.tables:
        assert all(queue.entries for _, _, queue in table.cells())
        assert all(bucket for bucket in table.buckets.values())
        assert sum(len(queue.entries) for _, _, queue in table.cells()) == 2
    # removing an entry no table holds is a no-op
    gone = c.tables[0]
    stranger = type(c.entries()[0])(seq=99, key=key(300.0), query=q, feature=v, nbytes=32)
    gone.remove(stranger)
    gone.remove(c.entries()[0])
    gone.remove(c.entries()[0])  # twice: its bucket is gone the second time
    assert sum(len(queue.entries) for _, _, queue in gone.cells()) == 1


def test_different_feature_shapes_in_one_cell_are_an_error():
    c = single()
    c.insert(key(5.0), Q, torch.zeros(2))
    c.insert(key(6.0), Q, torch.zeros(3))
    with pytest.raises(ValueError, match=r"^entries of one cell have features of different "
                                         r"shapes: clear the cache when the model or the batch "
                                         r"layout changes$"):
        c.retrieve(key(5.0), Q)


def test_off_mode_and_bad_grids_explain_themselves():
    with pytest.raises(ValueError, match=r"^Hash3D mode 'off' has no cache: use make_cache\(cfg\), "
                                         r"which returns None for it$"):
        Hash3DCache(Hash3DConfig.preset("off"))
    with pytest.raises(ValueError, match=r"^grid d_azimuth must be > 0, got 0$"):
        GridSpec(0, 10.0, 0.1, 10.0)
    with pytest.raises(ValueError, match=r"^grid d_timestep must be > 0, got -1.0$"):
        GridSpec(10.0, 10.0, 0.1, -1.0)
    with pytest.raises(ValueError, match=r"^a grid needs 4 deltas \[d_az, d_el, d_r, d_t\], got \[1, 2\]$"):
        GridSpec.from_list([1, 2])


def test_seeded_retrieval_draws_default_to_seed_zero():
    import random

    from hash3d_dg.cache.table import make_cache

    cfg = Hash3DConfig.preset("paper", eta=0.5)
    ref = random.Random(0)
    want = [ref.random() < 0.5 for _ in range(40)]
    for c in (make_cache(cfg), Hash3DCache(cfg)):
        assert [c.should_retrieve() for _ in range(40)] == want
    ref = random.Random(7)
    assert [make_cache(cfg, 7).should_retrieve() for _ in range(1)] == [ref.random() < 0.5]
    assert make_cache(Hash3DConfig.preset("off")) is None


def test_stored_copies_are_contiguous():
    c = single()
    feature = torch.rand(1, 3, 4, 4).to(memory_format=torch.channels_last)
    c.insert(key(5.0), Q, feature)
    assert c.entries()[0].feature.is_contiguous()


# ------------------------------------------------------------------ blend and similarity precision

def test_blend_and_distances_compute_in_float32_or_float64():
    from hash3d_dg.cache.blend import blend_features, cosine, query_distances

    g = torch.Generator().manual_seed(0)
    stored = (torch.rand(3, 2000, generator=g) * 300).to(torch.float16)  # squares overflow fp16
    query = (torch.rand(2000, generator=g) * 300).to(torch.float16)
    d64 = ((stored.double() - query.double()) ** 2).sum(1)
    got = query_distances(query, stored)  # the default distance is the squared one
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), d64, rtol=1e-5, atol=0)
    feats = (torch.rand(3, 5, generator=g) * 1000).to(torch.float16)
    blended = blend_features(query, stored, feats)
    assert blended.dtype == torch.float32
    w = torch.softmax(-d64, 0)
    torch.testing.assert_close(blended.double(), (w[:, None] * feats.double()).sum(0), rtol=1e-6, atol=0)
    assert blend_features(query.double(), stored.double(), feats.double()).dtype == torch.float64
    assert blend_features(query.float(), stored.float(), feats.float()).dtype == torch.float32
    a, b = stored[0], stored[1].float()
    c64 = float((a.double() @ b.double()) / (a.double().norm() * b.double().norm()))
    assert cosine(a, b) == pytest.approx(c64, abs=1e-6)
    assert cosine(a, a) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"^unknown distance 'l1': expected 'squared' or 'l2'$"):
        query_distances(query, stored, "l1")


def test_view_angle_is_exact_at_zero_and_180_degrees():
    from hash3d_dg.cache.table import view_angle_deg

    for el in range(-85, 90, 7):
        for az in range(0, 360, 13):
            k = CacheKey(az + 0.1, el + 0.3, 2.0, 0.0)
            opposite = CacheKey(az + 180.1, -(el + 0.3), 2.0, 0.0)
            assert view_angle_deg(k, k) == pytest.approx(0.0, abs=1e-5)
            assert view_angle_deg(k, opposite) == pytest.approx(180.0, abs=1e-5)
