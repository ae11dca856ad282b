"""The Hash3D memory budget with full-size features: stable-zero123 at 256 px has a 32x32 latent,
and the feature entering the last up block's final pair is [320, 32, 32] per CFG row, so one
entry (cond + uncond rows, stored in fp16) holds a 1.31 MB feature and a 16 KB query."""

import pytest
import torch

from hash3d_dg.cache import CacheKey, Hash3DCache, Hash3DConfig

FEATURE = (2, 320, 32, 32)  # [n_copies (CFG), channels, h, w]
QUERY = (2, 4, 32, 32)  # the view's noisy latent rows
ENTRY_BYTES = (2 * 320 * 32 * 32 + 2 * 4 * 32 * 32) * 2  # fp16: 1.31 MB + 16 KB


def _key(i: int) -> CacheKey:
    # Cells never shared, in any of the paper's three grids: timesteps 31 apart (grids' dt <= 30).
    return CacheKey(azimuth=float(7 * i % 360), elevation=0.0, radius=2.0, timestep=float(31 * i))


@pytest.mark.parametrize("slots", [True, False])
@pytest.mark.parametrize("capacity", [5, 12])
def test_budget_holds_with_real_size_features_and_evicts_oldest_first(capacity, slots):
    budget = capacity * ENTRY_BYTES + ENTRY_BYTES // 2
    cfg = Hash3DConfig.preset("paper", memory_budget_bytes=budget, store_dtype="float16")
    cache = Hash3DCache(cfg, seed=0, slots=slots)
    torch.manual_seed(0)
    features = {}
    for i in range(3 * capacity):
        # The feature arrives as rows of a bigger batch (two views' CFG rows interleaved), in fp32.
        batch = torch.randn(2 * FEATURE[0], *FEATURE[1:])
        feature = batch[0::2]
        features[i] = feature.clone()
        cache.insert(_key(i), torch.randn(QUERY, dtype=torch.float16), feature)  # fp16 latents, as on GPU

        stored = cache.entries()
        assert cache.stats.bytes <= budget
        assert cache.stats.bytes == sum(e.nbytes for e in stored)
        if slots:
            # Real memory: the store's rows (the budget's entries + the one an insert adds before
            # the budget eviction), which every stored tensor views (no view of the batch).
            store = cache._slots
            real = sum(t.untyped_storage().nbytes() for t in (store.queries, store.features))
            assert real <= (capacity + 1) * ENTRY_BYTES
            assert all(t.untyped_storage().data_ptr() in (store.queries.data_ptr(), store.features.data_ptr())
                       for e in stored for t in (e.query, e.feature))
            assert cache.stats.bytes == len(stored) * ENTRY_BYTES
        else:
            # Real memory: each stored tensor owns exactly its own bytes (no view of the batch).
            real = sum(t.untyped_storage().nbytes() for e in stored for t in (e.query, e.feature))
            assert real == cache.stats.bytes == len(stored) * ENTRY_BYTES
        assert all(e.feature.dtype == torch.float16 and tuple(e.feature.shape) == FEATURE for e in stored)
        # Oldest evicted first: the survivors are the newest inserts, in order.
        expected = list(range(max(0, i + 1 - capacity), i + 1))
        assert [e.key.timestep for e in stored] == [31.0 * k for k in expected]
        assert cache.stats.budget_evictions == max(0, i + 1 - capacity)
        assert cache.stats.entries == len(stored) == min(i + 1, capacity)

    # Evicted cells miss in every grid; surviving ones return their own feature (fp16-rounded).
    assert cache.retrieve(_key(0), torch.zeros(QUERY, dtype=torch.float16)) is None
    last = 3 * capacity - 1
    found, _ = cache.retrieve(_key(last), torch.zeros(QUERY, dtype=torch.float16))
    torch.testing.assert_close(found.float(), features[last].half().float())


def test_an_entry_larger_than_the_budget_is_refused():
    cfg = Hash3DConfig.preset("paper", memory_budget_bytes=ENTRY_BYTES - 1, store_dtype="float16")
    cache = Hash3DCache(cfg, seed=0)
    cache.insert(_key(0), torch.randn(QUERY, dtype=torch.float16), torch.randn(FEATURE))
    assert cache.stats.rejected == 1 and cache.stats.bytes == 0 and cache.entries() == []
