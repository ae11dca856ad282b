"""The Hash3D feature table: grid-hashed buckets with per-cell queues, adaptive grid choice,
Eq. 6 blending and a global memory budget.

Structure (one ``GridTable`` per candidate grid):

    bucket index (Eq. 5)  ->  {cell (i, j, k, l)  ->  CellQueue (<= Q entries, running similarity)}

A bucket chains every cell that hashes to it (separate chaining), but a lookup only ever sees the
queue of the query's own cell, so cells whose indices collide modulo the table size are never
blended together. An insert goes into every grid's table (the same ``CacheEntry`` object
referenced, never copied); its bytes are counted once. An entry leaves the cache when no grid
references it any more (each grid evicts the oldest of a full cell queue), or, past the memory
budget, when it is the globally oldest entry (removed from every grid at once).

Where things live: the retrieve decision, the cells, the queues, eviction, the budget and the
counters are host state (the camera and the timestep are host values); the stored queries and
features are rows of a ``SlotStore`` on the device (``cache/slots.py``; per-entry copies for
entries of another layout, or with ``slots=False``), and so is the adaptive similarity of a
device-resident cache. Nothing here reads a device value back except ``similarity()`` and
``stats`` (once per read).
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field

import torch

from hash3d_dg.cache.blend import blend_features, cosine, cosine_tensor
from hash3d_dg.cache.config import Hash3DConfig
from hash3d_dg.cache.grid import CacheKey, Cell, GridSpec, bucket_index
from hash3d_dg.cache.slots import SlotStore

log = logging.getLogger(__name__)

_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class CacheEntry:
    """One stored computation.

    Attributes:
        seq: insertion number (global age: smaller is older).
        key: camera + timestep it was computed at.
        query: ``[*S]`` what retrieval distances compare (e.g. the noisy latent).
        feature: ``[*F]`` the cached deep feature.
        nbytes: bytes of ``query`` + ``feature``.
        grids: indices of the grids whose tables currently reference this entry.
        slot: the row of the cache's ``SlotStore`` holding ``query`` and ``feature`` (which are
            then views of it, valid while the entry is stored), or None for an entry that owns
            its own copies.
    """

    seq: int
    key: CacheKey
    query: torch.Tensor
    feature: torch.Tensor
    nbytes: int
    grids: set[int] = field(default_factory=set)
    slot: int | None = None


@dataclass(eq=False)
class CellQueue:
    """The entries of one grid cell, oldest first, and the cell's running feature similarity.

    ``similarity`` is None until an insert found entries to compare with; afterwards it follows
    ``s <- gamma*s + (1-gamma)*mean_i cos(v_new, v_i)`` (the first measurement initialises it,
    so it is not biased toward an arbitrary start value).
    """

    entries: deque = field(default_factory=deque)
    similarity: float | None = None
    #: the same running similarity kept on the device (float64, 0-d) by a device-resident
    #: cache; ``similarity`` then stays None until ``Hash3DCache.similarity`` reads it.
    device_similarity: torch.Tensor | None = None

    def update_similarity(self, mean_cos: float, gamma: float) -> None:
        self.similarity = mean_cos if self.similarity is None else gamma * self.similarity + (1 - gamma) * mean_cos

    def update_device_similarity(self, mean_cos: torch.Tensor, gamma: float) -> None:
        """``update_similarity`` on the device: the same float64 arithmetic, no host read."""
        s = self.device_similarity
        self.device_similarity = mean_cos if s is None else gamma * s + (1 - gamma) * mean_cos

    @property
    def measured(self) -> bool:
        """Whether the running similarity has been initialised (a host fact)."""
        return self.similarity is not None or self.device_similarity is not None


class GridTable:
    """One grid's hash table: ``bucket -> {cell -> CellQueue}``, with buckets stored sparsely."""

    def __init__(self, spec: GridSpec, table_size: int, primes: list[int], queue_size: int):
        self.spec = spec
        self.table_size = table_size
        self.primes = list(primes)
        self.queue_size = queue_size
        self.buckets: dict[int, dict[Cell, CellQueue]] = {}

    def locate(self, key: CacheKey) -> tuple[int, Cell]:
        """``(bucket index, cell)`` of ``key``."""
        cell = self.spec.cell(key)
        return bucket_index(cell, self.primes, self.table_size), cell

    def queue(self, key: CacheKey) -> CellQueue | None:
        """The queue of ``key``'s own cell, or None when that cell holds nothing."""
        return self.queue_at(self.spec.cell(key))

    def queue_at(self, cell: Cell) -> CellQueue | None:
        """The queue of grid cell ``cell``, or None when it holds nothing."""
        bucket = self.buckets.get(bucket_index(cell, self.primes, self.table_size))
        return None if bucket is None else bucket.get(cell)

    def queue_for_insert(self, key: CacheKey) -> CellQueue:
        idx, cell = self.locate(key)
        return self.buckets.setdefault(idx, {}).setdefault(cell, CellQueue())

    def push(self, queue: CellQueue, entry: CacheEntry) -> list[CacheEntry]:
        """Append ``entry`` to ``queue``; return the entries evicted (oldest first) to keep Q."""
        queue.entries.append(entry)
        evicted = []
        while len(queue.entries) > self.queue_size:
            evicted.append(queue.entries.popleft())
        return evicted

    def remove(self, entry: CacheEntry) -> None:
        """Drop ``entry`` from its cell's queue (and the queue/bucket when they become empty)."""
        idx, cell = self.locate(entry.key)
        bucket = self.buckets.get(idx)
        queue = None if bucket is None else bucket.get(cell)
        if queue is None:
            return
        try:
            queue.entries.remove(entry)
        except ValueError:
            return
        if not queue.entries:
            del bucket[cell]
            if not bucket:
                del self.buckets[idx]

    def cells(self) -> list[tuple[int, Cell, CellQueue]]:
        """Every ``(bucket index, cell, queue)`` held."""
        return [(idx, cell, q) for idx, bucket in self.buckets.items() for cell, q in bucket.items()]

    def clear(self) -> None:
        self.buckets.clear()


@dataclass
class CacheStats:
    """Counters of one ``Hash3DCache``.

    Invariants: ``attempts == hits + misses``; ``sum(hits_by_grid) == hits``;
    ``entries == inserts - evictions``; ``bytes <= memory budget``.

    Attributes:
        attempts: retrievals tried.
        hits: retrievals served from the table.
        misses: retrievals that found the query's cell empty in every grid.
        fallback_hits: the part of ``hits`` served from another timestep cell of the query's
            camera cell (``timestep_fallback`` policy).
        gated: retrievals that found entries but none within ``camera_gate_deg``.
        inserts: entries stored.
        evictions: entries that left the cache (queue overflow in every grid, the memory budget,
            or ``clear(reset_stats=False)``).
        budget_evictions: the part of ``evictions`` forced by the memory budget.
        rejected: inserts refused because one entry alone exceeds the budget.
        entries: entries currently stored.
        bytes: bytes of the stored tensors now (each entry once).
        hits_by_grid: hits served by each grid.
    """

    attempts: int = 0
    hits: int = 0
    misses: int = 0
    fallback_hits: int = 0
    gated: int = 0
    inserts: int = 0
    evictions: int = 0
    budget_evictions: int = 0
    rejected: int = 0
    entries: int = 0
    bytes: int = 0
    hits_by_grid: list[int] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        """Hits per attempt (0 without attempts)."""
        return self.hits / self.attempts if self.attempts else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


def _stored_copy(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A detached, contiguous copy that owns its storage (so a slice of a batch does not keep the
    whole batch alive and later in-place edits of ``t`` cannot change the cache)."""
    t = t.detach()
    return t.to(dtype=dtype or t.dtype, copy=True, memory_format=torch.contiguous_format)


class Hash3DCache:
    """The Hash3D feature cache (paper Section 4; Eq. 5-8), model-agnostic.

    Args:
        cfg: settings; ``cfg.mode`` must not be ``"off"`` (use ``make_cache``, which returns None).
        seed: seed of the generator behind ``should_retrieve``.
        device_resident: see the attribute.
        slots: keep the stored tensors in a preallocated ``SlotStore`` (False: one copy per
            entry, the reference the store is tested against; the numbers are the same).
    """

    def __init__(self, cfg: Hash3DConfig, seed: int = 0, device_resident: bool | None = None,
                 slots: bool = True):
        cfg.validate()
        if not cfg.enabled:
            raise ValueError("Hash3D mode 'off' has no cache: use make_cache(cfg), which returns None for it")
        self.cfg = cfg
        self.adaptive = bool(cfg.adaptive)
        self.tables = [GridTable(GridSpec.from_list(g), cfg.table_size, cfg.primes, cfg.queue_size)
                       for g in cfg.active_grids()]
        self._store_dtype = _STORE_DTYPES.get(cfg.store_dtype)
        self._rng = random.Random(seed)
        self._registry: OrderedDict[int, CacheEntry] = OrderedDict()  # oldest first
        self._seq = 0
        self._stats = CacheStats(hits_by_grid=[0] * len(self.tables))
        #: keep the adaptive similarity on the device and choose among measured grids there (no
        #: host read per insert or retrieval); None: decided by the first insert's device
        #: (``accel.is_accelerator``). The CPU path keeps host floats (the reference).
        self.device_resident = device_resident
        #: grid hits chosen on the device: {candidate grids: one-hot counts}, folded on read
        self._pending_grid_hits: dict[tuple[int, ...], torch.Tensor] = {}
        self._device_choice: list | None = None  # set by _best_of for retrieve
        self.use_slots = bool(slots)
        #: rows for the entries of one layout, made at the first insert (see ``_store_for``)
        self._slots: SlotStore | None = None

    @property
    def stats(self) -> CacheStats:
        """The counters (grid hits chosen on the device are read back here, once per read)."""
        if self._pending_grid_hits:
            pending, self._pending_grid_hits = self._pending_grid_hits, {}
            for grids, counts in pending.items():
                for m, n in zip(grids, counts.tolist()):
                    self._stats.hits_by_grid[m] += int(n)
        return self._stats

    @stats.setter
    def stats(self, value: CacheStats) -> None:
        self._stats = value
        self._pending_grid_hits = {}

    def _resident(self, like: torch.Tensor) -> bool:
        if self.device_resident is None:
            from hash3d_dg.accel import is_accelerator

            self.device_resident = is_accelerator(like.device)
        return bool(self.device_resident)

    # -- the retrieve-or-update decision ------------------------------------------------------
    def should_retrieve(self) -> bool:
        """Bernoulli(eta) from the cache's own seeded generator."""
        return self._rng.random() < self.cfg.eta

    # -- lookups -------------------------------------------------------------------------------
    def _matching(self, queue: CellQueue, key: CacheKey, query: torch.Tensor) -> tuple[list[CacheEntry], bool]:
        """Entries of ``queue`` usable for ``(key, query)``: same query shape and, with
        ``camera_gate_deg``, a camera within the gate. Also returns whether the gate removed
        every shape-matching entry."""
        entries = [e for e in queue.entries if e.query.shape == query.shape]
        gate = self.cfg.camera_gate_deg
        if gate is None or not entries:
            return entries, False
        kept = [e for e in entries if view_angle_deg(key, e.key) <= float(gate)]
        return kept, not kept

    def _best_of(self, cells: list[Cell | None], key: CacheKey, query: torch.Tensor
                 ) -> tuple[int, list[CacheEntry], bool]:
        """Among grid ``m``'s cell ``cells[m]`` (None: skip), the best usable one (adaptive rank),
        as ``(grid, entries, gated)``; grid -1 when none is usable."""
        best: tuple[tuple, int, list[CacheEntry]] | None = None
        gated = False
        measured: list[tuple[int, CellQueue, list[CacheEntry]]] = []
        for m, (table, cell) in enumerate(zip(self.tables, cells)):
            if cell is None:
                continue
            queue = table.queue_at(cell)
            if queue is None:
                continue
            entries, was_gated = self._matching(queue, key, query)
            gated = gated or was_gated
            if not entries:
                continue
            if queue.device_similarity is not None:
                measured.append((m, queue, entries))
                continue
            s = queue.similarity
            rank = (s is not None, s if s is not None else 0.0, -m)
            if best is None or rank > best[0]:
                best = (rank, m, entries)
        if measured:  # device-resident: measured cells outrank unmeasured ones
            if len(measured) == 1:
                return measured[0][0], measured[0][2], gated
            self._device_choice = measured  # several: the device picks (retrieve)
            return measured[0][0], measured[0][2], gated
        return (-1, [], gated) if best is None else (best[1], best[2], gated)

    def choose(self, key: CacheKey, query: torch.Tensor) -> tuple[int, list[CacheEntry], bool, bool] | None:
        """``(grid, entries, from_fallback, gated)`` that would serve ``(key, query)``, or None.

        First the query's own cell in every grid: among grids whose cell holds usable entries,
        the adaptive cache takes the one with the highest running similarity (a cell never
        measured ranks below any measured one; ties go to the earlier, finer grid); the
        non-adaptive cache has one grid. When none is usable and ``timestep_fallback`` is
        ``F > 0``, the cells ``(i, j, k, l -/+ d)`` of the same camera cell for ``d = 1..F``,
        ``l - d`` before ``l + d``, each ranked across grids the same way.
        """
        self._device_choice = None
        own = [table.spec.cell(key) for table in self.tables]
        m, entries, gated = self._best_of(own, key, query)
        if m >= 0:
            return m, entries, False, gated
        for d in range(1, int(self.cfg.timestep_fallback) + 1):
            for sign in (-1, 1):
                cells = [(i, j, k, l + sign * d) for (i, j, k, l) in own]
                m, entries, g = self._best_of(cells, key, query)
                gated = gated or g
                if m >= 0:
                    return m, entries, True, gated
        return None if not gated else (-1, [], False, True)

    def choose_grid(self, key: CacheKey, query: torch.Tensor) -> tuple[int, list[CacheEntry]] | None:
        """The grid that would serve ``(key, query)`` and its usable entries, or None (see
        :meth:`choose`)."""
        chosen = self.choose(key, query)
        if chosen is None or chosen[0] < 0:
            return None
        return chosen[0], chosen[1]

    def retrieve(self, key: CacheKey, query: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """Eq. 6 blend of the entries in ``key``'s cell: ``(feature, grid index)`` or None (miss).

        Args:
            key: camera + timestep of the query.
            query: ``[*S]`` compared with the stored queries (same shape as inserted).

        Returns:
            The blended feature ``[*F]`` (in the stored dtype, on the stored device) and the index
            of the grid that served it; None when the cell is empty in every grid.
        """
        self._stats.attempts += 1
        chosen = self.choose(key, query)
        if chosen is None or chosen[0] < 0:
            self._stats.misses += 1
            if chosen is not None:
                self._stats.gated += 1
            return None
        m, entries, from_fallback, _ = chosen
        candidates, self._device_choice = self._device_choice, None
        if from_fallback:
            self._stats.fallback_hits += 1
        self._stats.hits += 1
        if candidates:  # several measured grids: blend each, pick the most similar on the device
            blends = torch.stack([self._blend(query, e) for _, _, e in candidates])
            sims = torch.stack([q.device_similarity for _, q, _ in candidates])
            pick = torch.argmax(sims)  # the first of equals: the finer grid, as on the host
            grids = tuple(c[0] for c in candidates)
            hit = (torch.arange(len(grids), device=sims.device) == pick).long()  # no checks read
            pending = self._pending_grid_hits
            pending[grids] = hit if grids not in pending else pending[grids] + hit
            return blends.index_select(0, pick.reshape(1))[0], -1  # a gather, not an int index
        self._stats.hits_by_grid[m] += 1
        return self._blend(query, entries), m

    def _blend(self, query: torch.Tensor, entries: list[CacheEntry]) -> torch.Tensor:
        feats = [e.feature for e in entries]
        if any(f.shape != feats[0].shape for f in feats):
            raise ValueError("entries of one cell have features of different shapes: "
                             "clear the cache when the model or the batch layout changes")
        if self._slots is not None and all(e.slot is not None for e in entries):
            queries, stacked = self._slots.gather([e.slot for e in entries])  # rows, no stack
        else:
            queries, stacked = torch.stack([e.query for e in entries]), torch.stack(feats)
        blended = blend_features(query, queries, stacked, self.cfg.distance)
        return blended.to(feats[0].dtype)

    def similarity(self, key: CacheKey) -> list[float | None]:
        """Running similarity of ``key``'s cell in each grid (None: empty or never measured)."""
        out: list[float | None] = []
        for table in self.tables:
            q = table.queue(key)
            if q is not None and q.device_similarity is not None:  # a host read
                out.append(float(q.device_similarity))
            else:
                out.append(None if q is None else q.similarity)
        return out

    # -- updates -------------------------------------------------------------------------------
    def insert(self, key: CacheKey, query: torch.Tensor, feature: torch.Tensor) -> None:
        """Store ``(key, query, feature)`` in every grid (one shared entry, detached copies).

        Args:
            key: camera + timestep it was computed at.
            query: ``[*S]``.
            feature: ``[*F]``.
        """
        v_dtype = self._store_dtype or feature.dtype
        nbytes = query.numel() * query.element_size() + feature.numel() * v_dtype.itemsize
        if nbytes > self.cfg.memory_budget_bytes:
            self._stats.rejected += 1
            log.warning("Hash3D entry of %d bytes exceeds the memory budget of %d bytes; not stored",
                        nbytes, self.cfg.memory_budget_bytes)
            return
        store = self._store_for(query, feature, v_dtype, nbytes)
        taken = None if store is None else store.take()
        if taken is not None:
            slot, grew = taken
            if grew:  # the rows moved: the stored entries' views are taken again
                for e in self._registry.values():
                    if e.slot is not None:
                        e.query, e.feature = store.view(e.slot)
            q, v = store.put(slot, query, feature)
        else:
            slot, q, v = None, _stored_copy(query, None), _stored_copy(feature, self._store_dtype)
        entry = CacheEntry(seq=self._seq, key=key, query=q, feature=v, nbytes=nbytes, slot=slot)
        self._seq += 1
        self._registry[entry.seq] = entry
        self._stats.inserts += 1
        self._stats.bytes += nbytes

        cos_memo: dict[int, float] = {}
        resident = self.adaptive and self._resident(v)
        for m, table in enumerate(self.tables):
            queue = table.queue_for_insert(key)
            if resident:
                older = [e for e in queue.entries if e.feature.shape == v.shape]
                if older:
                    sims = []
                    for e in older:
                        if e.seq not in cos_memo:
                            cos_memo[e.seq] = cosine_tensor(v, e.feature).double()
                        sims.append(cos_memo[e.seq])
                    total = sims[0]
                    for x in sims[1:]:  # left to right, as Python's sum on the host
                        total = total + x
                    queue.update_device_similarity(total / len(sims), self.cfg.gamma)
            elif self.adaptive:
                older = [e for e in queue.entries if e.feature.shape == v.shape]
                if older:
                    sims = []
                    for e in older:
                        if e.seq not in cos_memo:
                            cos_memo[e.seq] = cosine(v, e.feature)
                        sims.append(cos_memo[e.seq])
                    queue.update_similarity(sum(sims) / len(sims), self.cfg.gamma)
            entry.grids.add(m)
            for old in table.push(queue, entry):
                old.grids.discard(m)
                if not old.grids:
                    self._drop(old)
        while self._stats.bytes > self.cfg.memory_budget_bytes:
            oldest = next(iter(self._registry.values()))
            self._evict(oldest)
            self._stats.budget_evictions += 1
        self._stats.entries = len(self._registry)

    def _store_for(self, query: torch.Tensor, feature: torch.Tensor, v_dtype: torch.dtype,
                   nbytes: int) -> SlotStore | None:
        """The store for an entry of this layout: the current one when the layout matches, a new
        one when none exists or the current one holds no entry (after a clear or once every entry
        of an earlier batch layout has left); None (own copies) while entries of another layout
        are stored."""
        if not self.use_slots or query.device != feature.device:
            return None
        store = self._slots
        if store is not None and store.layout == SlotStore.layout_of(query, feature, v_dtype):
            return store
        if store is None or store.live == 0:
            limit = self.cfg.memory_budget_bytes // nbytes + 1  # the budget's bound, + the new one
            self._slots = store = SlotStore(query, feature, v_dtype, limit)
            return store
        return None

    def _drop(self, entry: CacheEntry) -> None:
        """Forget an entry no grid references any more (its slot is free again)."""
        del self._registry[entry.seq]
        if entry.slot is not None:
            self._slots.free(entry.slot)
            entry.slot = None
        self._stats.bytes -= entry.nbytes
        self._stats.evictions += 1

    def _evict(self, entry: CacheEntry) -> None:
        """Remove an entry from every grid that references it, then forget it."""
        for m in sorted(entry.grids):
            self.tables[m].remove(entry)
        entry.grids.clear()
        self._drop(entry)

    def entries(self) -> list[CacheEntry]:
        """All stored entries, oldest first."""
        return list(self._registry.values())

    def clear(self, reset_stats: bool = True) -> None:
        """Drop every entry. With ``reset_stats=False`` the counters continue (the dropped entries
        count as evictions)."""
        dropped = len(self._registry)
        for table in self.tables:
            table.clear()
        for entry in self._registry.values():
            entry.slot = None
        self._registry.clear()
        if self._slots is not None:
            self._slots.reset()
        if reset_stats:
            self.stats = CacheStats(hits_by_grid=[0] * len(self.tables))
        else:
            self._stats.evictions += dropped
            self._stats.entries = 0
            self._stats.bytes = 0


def view_angle_deg(a: CacheKey, b: CacheKey) -> float:
    """Angle in degrees between the view directions of two keys' (elevation, azimuth) on the
    orbit sphere (radius and timestep ignored)."""
    def direction(k: CacheKey) -> tuple[float, float, float]:
        el, az = math.radians(k.elevation), math.radians(k.azimuth)
        return math.cos(el) * math.sin(az), -math.sin(el), math.cos(el) * math.cos(az)

    da, db = direction(a), direction(b)
    dot = max(-1.0, min(1.0, sum(x * y for x, y in zip(da, db))))
    return math.degrees(math.acos(dot))


def make_cache(cfg: Hash3DConfig, seed: int = 0) -> Hash3DCache | None:
    """A ``Hash3DCache`` for ``cfg``, or None when ``cfg.mode == "off"``."""
    return Hash3DCache(cfg, seed) if cfg.enabled else None
