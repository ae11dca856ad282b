"""Property tests of the Hash3D table: its bucket structure and eviction agree with a flat reference
model (dict keyed by cell, no hashing), and its invariants hold after every operation."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hash3d_dg.cache import CacheKey, GridSpec, Hash3DCache, Hash3DConfig
from hash3d_dg.cache.blend import blend_weights

SETTINGS = settings(max_examples=60, deadline=None)

# Coordinates on a coarse lattice so that many keys share cells (and float arithmetic is exact).
azimuths = st.integers(-720, 720).map(lambda v: v * 2.5)
elevations = st.integers(-30, 30).map(lambda v: v * 2.5)
radii = st.sampled_from([1.5, 1.8, 2.0, 2.2])
timesteps = st.integers(20, 980)
keys = st.builds(CacheKey, azimuths, elevations, radii, timesteps)
grid_sets = st.sampled_from([
    [[10, 10, 0.1, 10]],
    [[30, 30, 0.2, 200]],
    [[10, 10, 0.1, 10], [20, 20, 0.15, 20], [30, 30, 0.2, 30]],
    [[45, 45, 0.5, 500], [90, 90, 1.0, 1000]],
])
ENTRY_BYTES = 2 * 4 * 4  # query [4] + feature [4], float32


@st.composite
def scenarios(draw):
    grids = draw(grid_sets)
    cfg = Hash3DConfig.preset(
        "paper", eta=1.0, grids=grids, adaptive=len(grids) > 1,
        queue_size=draw(st.integers(1, 4)),
        table_size=draw(st.sampled_from([1, 2, 3, 7, 1024])),
        memory_budget_bytes=draw(st.integers(1, 12)) * ENTRY_BYTES,
    )
    inserts = draw(st.lists(keys, min_size=1, max_size=40))
    return cfg, inserts


class ReferenceTable:
    """The specification without hashing: per grid, cell -> seqs (oldest first, at most Q); an
    entry lives while some grid holds it; past the budget the oldest living entry goes."""

    def __init__(self, cfg: Hash3DConfig):
        self.specs = [GridSpec.from_list(g) for g in cfg.active_grids()]
        self.q = cfg.queue_size
        self.budget = cfg.memory_budget_bytes
        self.cells: list[dict] = [dict() for _ in self.specs]
        self.alive: list[int] = []
        self.seq = 0

    def insert(self, key: CacheKey) -> None:
        seq = self.seq
        self.seq += 1
        self.alive.append(seq)
        for m, spec in enumerate(self.specs):
            lst = self.cells[m].setdefault(spec.cell(key), [])
            lst.append(seq)
            del lst[:-self.q]
        held = {s for grid in self.cells for lst in grid.values() for s in lst}
        self.alive = [s for s in self.alive if s in held]
        while len(self.alive) * ENTRY_BYTES > self.budget:
            oldest = self.alive.pop(0)
            for grid in self.cells:
                for lst in grid.values():
                    if oldest in lst:
                        lst.remove(oldest)

    def cell_contents(self, m: int) -> dict:
        return {cell: lst for cell, lst in self.cells[m].items() if lst}


def check_invariants(cache: Hash3DCache) -> None:
    cfg = cache.cfg
    entries = cache.entries()
    s = cache.stats
    assert s.bytes == sum(e.nbytes for e in entries) <= cfg.memory_budget_bytes
    assert s.entries == len(entries) == s.inserts - s.evictions
    assert s.hits + s.misses == s.attempts and sum(s.hits_by_grid) == s.hits
    referenced = {}
    for m, table in enumerate(cache.tables):
        for idx, cell, queue in table.cells():
            assert 0 < len(queue.entries) <= cfg.queue_size
            assert idx == (cell[0] + cfg.primes[0] * cell[1] + cfg.primes[1] * cell[2]
                           + cfg.primes[2] * cell[3]) % cfg.table_size
            for e in queue.entries:
                assert table.spec.cell(e.key) == cell  # a bucket never mixes cells
                referenced.setdefault(id(e), set()).add(m)
            seqs = [e.seq for e in queue.entries]
            assert seqs == sorted(seqs)  # oldest first
    assert {id(e): e.grids for e in entries} == referenced


@SETTINGS
@given(scenarios())
def test_table_matches_flat_reference(scenario):
    cfg, inserts = scenario
    cache = Hash3DCache(cfg)
    ref = ReferenceTable(cfg)
    for n, k in enumerate(inserts):
        cache.insert(k, torch.full((4,), float(n)), torch.full((4,), float(-n)))
        ref.insert(k)
        check_invariants(cache)
    for m, table in enumerate(cache.tables):
        got = {cell: [e.seq for e in q.entries] for _, cell, q in table.cells()}
        assert got == ref.cell_contents(m)
    assert [e.seq for e in cache.entries()] == ref.alive


@SETTINGS
@given(scenarios(), st.data())
def test_retrieval_returns_own_cell_and_nearest(scenario, data):
    cfg, inserts = scenario
    cfg.memory_budget_bytes = 10**6
    cache = Hash3DCache(cfg)
    for n, k in enumerate(inserts):
        # queries far apart (squared distance >= 400): the identical one takes all the weight
        cache.insert(k, torch.full((4,), 10.0 * n), torch.full((4,), float(n)))
    probe = data.draw(st.sampled_from(cache.entries()))
    out, grid = cache.retrieve(probe.key, probe.query)
    table = cache.tables[grid]
    members = list(table.queue(probe.key).entries)
    assert all(table.spec.cell(e.key) == table.spec.cell(probe.key) for e in members)
    # Eq. 6 over exactly the members of the probe's own cell in the serving grid
    d = torch.stack([((e.query.double() - probe.query.double()) ** 2).sum() for e in members])
    w = torch.softmax(-d, 0)
    expected = sum(wi * e.feature.double() for wi, e in zip(w, members))
    assert torch.allclose(out.double(), expected, atol=1e-6)
    if any(e is probe for e in members):
        assert torch.equal(out, probe.feature)
    if not cache.adaptive:
        assert grid == 0 and any(e is probe for e in members)


@SETTINGS
@given(keys, st.integers(-3, 3))
def test_azimuth_period_360(k, turns):
    shifted = CacheKey(k.azimuth + 360.0 * turns, k.elevation, k.radius, k.timestep)
    for g in ([10, 10, 0.1, 10], [20, 20, 0.15, 20], [30, 30, 0.2, 30], [25, 10, 0.1, 10]):
        spec = GridSpec.from_list(g)
        assert spec.cell(k) == spec.cell(shifted)
        assert 0 <= spec.cell(k)[0] < spec.n_azimuth_cells


@SETTINGS
@given(keys, st.sampled_from([1, 7, 1024]))
def test_identical_keys_same_bucket(k, n):
    cache = Hash3DCache(Hash3DConfig.preset("paper", table_size=n))
    twin = CacheKey(float(k.azimuth), float(k.elevation), float(k.radius), float(k.timestep))
    for table in cache.tables:
        idx, cell = table.locate(k)
        assert (idx, cell) == table.locate(twin) and 0 <= idx < n


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 6), st.floats(0.01, 1000.0), st.sampled_from(["squared", "l2"]),
       st.integers(0, 2**31 - 1))
def test_blend_weights_properties(k, dim, scale, distance, seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(dim, generator=g) * scale
    stored = torch.randn(k, dim, generator=g) * scale
    w = blend_weights(query, stored, distance)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert math.isclose(float(w.sum()), 1.0, abs_tol=1e-5)
    d = ((stored.double() - query.double()) ** 2).sum(1)
    if distance == "l2":
        d = d.sqrt()
    assert int(w.argmax()) in set(torch.nonzero(d == d.min()).flatten().tolist())
    perm = torch.randperm(k, generator=g)
    assert torch.allclose(blend_weights(query, stored[perm], distance), w[perm], atol=1e-6)
