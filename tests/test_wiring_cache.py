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
