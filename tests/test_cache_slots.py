"""The slot store (``cache/slots.py``): the same numbers as per-entry copies, no allocation per
insert, one gather per blend."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hash3d_dg.cache import slots as slots_mod
from hash3d_dg.cache.config import Hash3DConfig
from hash3d_dg.cache.grid import CacheKey
from hash3d_dg.cache.table import Hash3DCache

ENTRY = (2, 5, 4, 4)  # [n_copies, C, H, W]: query and feature alike (float32: 640 bytes each)
ENTRY_BYTES = 2 * 2 * 5 * 4 * 4 * 4


class _Ops(TorchDispatchMode):
    """Records the aten ops run inside."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _key(rng: random.Random) -> CacheKey:
    return CacheKey(rng.uniform(0.0, 45.0), rng.uniform(-12.0, 12.0), 2.0, rng.choice([480.0, 500.0, 520.0, 700.0]))


def _run(cache: Hash3DCache, seed: int, steps: int = 260, shape_change: bool = True) -> list:
    """A seeded stream of inserts, retrievals and clears (a batch-shape change in the middle);
    everything observable after each step."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    log: list = []
    shape = ENTRY
    for step in range(steps):
        if shape_change and step == steps // 2:
            shape = (3, *ENTRY[1:])  # the batch layout changes; the old entries stay
        key = _key(rng)
        query = torch.randn(shape, generator=gen)
        r = rng.random()
        if r < 0.45:
            found = cache.retrieve(key, query)
            log.append(None if found is None else (found[0], found[1]))
        elif r < 0.985:
            batch = torch.randn(2 * shape[0], *shape[1:], generator=gen)  # a strided slice, as in the UNet
            cache.insert(key, query, batch[1::2])
        else:
            cache.clear(reset_stats=rng.random() < 0.5)
        log.append(cache.stats.as_dict())
        log.append(cache.similarity(key))
        log.append([(e.seq, e.key, sorted(e.grids), e.nbytes, e.query.clone(), e.feature.clone())
                    for e in cache.entries()])  # clones: rows are reused after an eviction
    return log


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b) and torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


CONFIGS = {
    "paper": dict(mode="paper", eta=1.0),
    "paper_small_budget": dict(mode="paper", eta=1.0, memory_budget_bytes=7 * ENTRY_BYTES + 100),
    "official": dict(mode="official", eta=1.0),
    "fast": dict(mode="fast"),
    "fp16_store_one_grid": dict(mode="paper", adaptive=False, store_dtype="float16",
                                memory_budget_bytes=40 * ENTRY_BYTES),
    "queue1_fallback": dict(mode="paper", queue_size=1, timestep_fallback=2, table_size=7),
}


@pytest.mark.parametrize("resident", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_slots_give_bitwise_the_numbers_of_per_entry_copies(name, resident, monkeypatch):
    monkeypatch.setattr(slots_mod, "INITIAL_SLOTS", 4)  # the store grows several times
    kw = dict(CONFIGS[name])
    cfg = Hash3DConfig.preset(kw.pop("mode"), **kw)
    ref = Hash3DCache(cfg, seed=3, device_resident=resident, slots=False)
    new = Hash3DCache(cfg, seed=3, device_resident=resident, slots=True)
    gathered, own_copies = [], []
    gather, insert = slots_mod.SlotStore.gather, Hash3DCache.insert

    def spy_gather(self, slots):
        gathered.append(list(slots))
        return gather(self, slots)

    def spy_insert(self, *args):
        insert(self, *args)
        if self.use_slots:
            own_copies.extend(e.seq for e in self.entries() if e.slot is None)

    monkeypatch.setattr(slots_mod.SlotStore, "gather", spy_gather)
    monkeypatch.setattr(Hash3DCache, "insert", spy_insert)
    a, b = _run(ref, seed=11), _run(new, seed=11)
    # the stream blended several rows, not all consecutive, and stored entries of another layout
    assert any(len(g) > 1 and g != list(range(g[0], g[0] + len(g))) for g in gathered) or cfg.queue_size == 1
    assert own_copies and len(set(own_copies)) < new.stats.inserts
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert _same(x, y), f"step {i // 4}: {x!r} != {y!r}"
    assert ref._slots is None and new._slots is not None
    stats = ref.stats
    assert stats.hits > 20 and stats.inserts > 100  # the stream exercised the table
    if name == "paper_small_budget":
        assert stats.budget_evictions > 20
        assert new._slots.capacity <= 8  # the budget's 7 entries + the one inserted before eviction


def test_blends_gather_rows_instead_of_stacking():
    cfg = Hash3DConfig.preset("paper", eta=1.0, adaptive=False, queue_size=3)
    cache = Hash3DCache(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    key = CacheKey(5.0, 5.0, 2.0, 505.0)
    other = CacheKey(55.0, 5.0, 2.0, 505.0)
    for k in (key, other, key, other, key):  # key's cell: slots 0, 2, 4 (not consecutive)
        cache.insert(k, torch.randn(ENTRY, generator=gen), torch.randn(ENTRY, generator=gen))
    assert [e.slot for e in cache.entries()] == [0, 1, 2, 3, 4]
    query = torch.randn(ENTRY, generator=gen)
    with _Ops() as rec:
        found, _ = cache.retrieve(key, query)
    assert "index_select" in rec.ops and "stack" not in rec.ops and "cat" not in rec.ops
    entries = [e for e in cache.entries() if e.key == key]
    ref = Hash3DCache(cfg, seed=0, slots=False)._blend(query, entries)  # the stacking path
    assert torch.equal(found, ref)
    # The retrieved feature owns its storage: later inserts into the rows cannot change it.
    assert found.untyped_storage().data_ptr() != cache._slots.features.untyped_storage().data_ptr()


def test_inserts_copy_into_preallocated_rows_and_allocate_nothing_after_the_first():
    budget = 10 * ENTRY_BYTES  # 11 rows: the budget's 10 entries + the one inserted before eviction
    cfg = Hash3DConfig.preset("paper", eta=1.0, adaptive=False, memory_budget_bytes=budget)
    cache = Hash3DCache(cfg, seed=0)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    cache.insert(_key(rng), torch.randn(ENTRY, generator=gen), torch.randn(ENTRY, generator=gen))
    store = cache._slots
    assert store.capacity == 11
    ptrs = (store.queries.data_ptr(), store.features.data_ptr())
    row = store.features[0].numel() * store.features.element_size()
    for _ in range(60):
        q, v = torch.randn(ENTRY, generator=gen), torch.randn(2 * ENTRY[0], *ENTRY[1:], generator=gen)[::2]
        with _Ops() as rec:
            cache.insert(_key(rng), q, v)
        assert set(rec.ops) <= {"select", "detach", "copy_"}, rec.ops  # views and copies: no allocation
        assert (store.queries.data_ptr(), store.features.data_ptr()) == ptrs
        for e in cache.entries():
            offset = e.feature.data_ptr() - ptrs[1]
            assert 0 <= offset < store.capacity * row and offset % row == 0
            assert e.feature.untyped_storage().data_ptr() == ptrs[1]
    assert cache.stats.budget_evictions > 0
    assert store.live == cache.stats.entries <= 10


def test_store_grows_by_doubling_up_to_the_budget_bound(monkeypatch):
    monkeypatch.setattr(slots_mod, "INITIAL_SLOTS", 2)
    cfg = Hash3DConfig.preset("paper", eta=1.0, adaptive=False, queue_size=1,
                              memory_budget_bytes=12 * ENTRY_BYTES)
    cache = Hash3DCache(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    caps = []
    for i in range(30):  # every key its own cell: only the budget evicts
        feature = torch.randn(ENTRY, generator=gen)
        cache.insert(CacheKey(10.0 * i, 0.0, 2.0, 500.0), torch.randn(ENTRY, generator=gen), feature)
        caps.append(cache._slots.capacity)
        # the views moved with the rows: every entry still reads its own feature
        assert torch.equal(cache.entries()[-1].feature, feature)
    assert sorted(set(caps)) == [2, 4, 8, 13]
    found, _ = cache.retrieve(CacheKey(10.0 * 29, 0.0, 2.0, 500.0), torch.zeros(ENTRY))
    assert torch.equal(found, feature)


def test_a_batch_shape_change_keeps_own_copies_until_the_store_empties():
    cfg = Hash3DConfig.preset("paper", eta=1.0, adaptive=False)
    cache = Hash3DCache(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    key = CacheKey(5.0, 5.0, 2.0, 505.0)
    cache.insert(key, torch.randn(ENTRY, generator=gen), torch.randn(ENTRY, generator=gen))
    other = (3, *ENTRY[1:])
    feature = torch.randn(other, generator=gen)
    cache.insert(key, torch.randn(other, generator=gen), feature)
    old, new = cache.entries()
    assert old.slot == 0 and new.slot is None  # another layout: its own copy
    assert new.feature.untyped_storage().nbytes() == feature.numel() * 4
    found, _ = cache.retrieve(key, torch.zeros(other))  # only the matching shape is blended
    assert torch.equal(found, feature)
    cache.clear()
    assert cache._slots.live == 0
    cache.insert(key, torch.randn(other, generator=gen), feature)  # an empty store is re-made
    assert cache.entries()[0].slot == 0 and tuple(cache._slots.features.shape[1:]) == other


@pytest.mark.parametrize("initial", [1, 4])
def test_rows_written_inside_and_outside_inference_mode(initial, monkeypatch):
    monkeypatch.setattr(slots_mod, "INITIAL_SLOTS", initial)  # 1: the store grows inside the mode
    cfg = Hash3DConfig.preset("paper", eta=1.0, adaptive=False, memory_budget_bytes=ENTRY_BYTES)
    cache = Hash3DCache(cfg, seed=0)  # two rows: one entry + the one inserted before eviction
    key = CacheKey(5.0, 5.0, 2.0, 505.0)
    with torch.inference_mode():
        cache.insert(key, torch.zeros(ENTRY), torch.ones(ENTRY))
        cache.insert(key, torch.zeros(ENTRY), torch.ones(ENTRY))
    cache.insert(key, torch.zeros(ENTRY), torch.full(ENTRY, 2.0))  # into a row made in the mode
    assert cache._slots.capacity == 2 and cache.stats.budget_evictions == 2
    found, _ = cache.retrieve(key, torch.zeros(ENTRY))
    assert torch.equal(found, torch.full(ENTRY, 2.0))
