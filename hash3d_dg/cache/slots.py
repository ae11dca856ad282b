"""Preallocated device slots for the entries of a ``Hash3DCache``.

Every entry of one cache point and one batch layout has the same query shape/dtype and the same
feature shape/dtype, so their tensors can live as rows of two device buffers instead of one
allocation per insert:

* device: ``queries [capacity, *S]`` and ``features [capacity, *F]``; an entry's ``query`` and
  ``feature`` are views of its row (slot). Inserting is a ``copy_`` into a free row; blending
  several entries gathers their rows with one ``index_select`` per buffer (a slice when the rows
  are consecutive, e.g. a single entry), instead of a ``torch.stack`` of separate tensors.
* host: the layout, the capacity, the free list of slot indices (an entry's slot is a host int),
  and the device index tensors of the gather patterns seen (uploaded once each, pinned and
  non-blocking through ``accel.upload``).

Capacity. The table's only global bound on its entries is the memory budget, which eviction
enforces after each insert: between inserts ``bytes <= memory_budget_bytes``, so at most
``budget // entry_bytes`` entries of this layout are stored, plus the one just inserted before the
budget eviction runs. ``limit = budget // entry_bytes + 1`` slots therefore always suffice. The
buffers start at ``min(limit, INITIAL_SLOTS)`` rows and double (one copy of the rows held) when
the free list runs dry, up to ``limit``: a cache that never fills its budget never reserves it,
and once grown, inserts allocate nothing. Store-less entries (another layout, after a batch
change) keep their own copies; see ``Hash3DCache.insert``.

No norms are stored: the blend (``||x - x_i||^2`` as a sum of squared differences) and the
cosine of the adaptive grid compute from the rows themselves, so the numbers stay bitwise those
of per-entry tensors.
"""

from __future__ import annotations

import torch

from hash3d_dg import accel

#: rows of a new store (fewer when the budget allows fewer entries)
INITIAL_SLOTS = 64
#: gather patterns whose device index tensor is kept (the memo is emptied past this)
_MAX_PATTERNS = 4096


class SlotStore:
    """Device rows for entries of one layout (see the module docstring).

    Args:
        query: an example query ``[*S]`` (shape, dtype and device of the stored queries).
        feature: an example feature ``[*F]`` (shape and device of the stored features).
        feature_dtype: dtype the features are stored in.
        limit: the most rows the store may grow to.
    """

    def __init__(self, query: torch.Tensor, feature: torch.Tensor, feature_dtype: torch.dtype, limit: int):
        self.layout = self.layout_of(query, feature, feature_dtype)
        self.limit = max(1, int(limit))
        cap = min(self.limit, INITIAL_SLOTS)
        with torch.inference_mode(False):  # plain tensors: rows are written in and out of that mode
            self.queries = torch.empty((cap, *query.shape), dtype=query.dtype, device=query.device)
            self.features = torch.empty((cap, *feature.shape), dtype=feature_dtype, device=feature.device)
        self._free = list(range(cap - 1, -1, -1))  # host; pop(): lowest first, then the last freed
        self._index: dict[tuple[int, ...], torch.Tensor] = {}

    @staticmethod
    def layout_of(query: torch.Tensor, feature: torch.Tensor, feature_dtype: torch.dtype) -> tuple:
        """What entries must share to live in one store (host values only)."""
        return (tuple(query.shape), query.dtype, query.device,
                tuple(feature.shape), feature_dtype, feature.device)

    @property
    def capacity(self) -> int:
        return self.queries.shape[0]

    @property
    def live(self) -> int:
        """Rows in use."""
        return self.capacity - len(self._free)

    def take(self) -> tuple[int, bool] | None:
        """A free slot and whether the buffers were reallocated to find it (the views of the
        rows held must then be taken again); None when the store is full at ``limit``."""
        grew = False
        if not self._free:
            cap = self.capacity
            if cap >= self.limit:
                return None
            new = min(self.limit, 2 * cap)
            with torch.inference_mode(False):
                queries = self.queries.new_empty((new, *self.queries.shape[1:]))
                features = self.features.new_empty((new, *self.features.shape[1:]))
            queries[:cap].copy_(self.queries)
            features[:cap].copy_(self.features)
            self.queries, self.features = queries, features
            self._free = list(range(new - 1, cap - 1, -1))
            grew = True
        return self._free.pop(), grew

    def put(self, slot: int, query: torch.Tensor, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy ``query`` and ``feature`` (cast to the stored dtype) into row ``slot``; returns the
        row views ``(query, feature)``. No allocation."""
        q, v = self.view(slot)
        q.copy_(query.detach())
        v.copy_(feature.detach())
        return q, v

    def view(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The views ``(query, feature)`` of row ``slot``."""
        return self.queries[slot], self.features[slot]

    def free(self, slot: int) -> None:
        """Give row ``slot`` back (host only; its contents stay until it is reused)."""
        self._free.append(slot)

    def reset(self) -> None:
        """Every row free (the buffers are kept)."""
        self._free = list(range(self.capacity - 1, -1, -1))

    def gather(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``slots`` of both buffers, ``([K, *S], [K, *F])``, contiguous: a slice when the
        rows are consecutive, else one ``index_select`` per buffer with an index uploaded once
        per pattern (pinned, non-blocking)."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            return self.queries[first:first + len(slots)], self.features[first:first + len(slots)]
        pattern = tuple(slots)
        index = self._index.get(pattern)
        if index is None:
            if len(self._index) >= _MAX_PATTERNS:
                self._index.clear()
            index = self._index[pattern] = accel.upload(slots, self.queries.device, torch.long)
        return self.queries.index_select(0, index), self.features.index_select(0, index)
