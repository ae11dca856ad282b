"""A denoiser call that reuses cached deep features: Hash3D's grid cache, or DeepCache-style reuse
along one denoising trajectory (the official code's stage 2).

Batch layout. A call denoises ``B`` views, each in ``n_copies`` rows (classifier-free guidance:
``[cond; uncond]``, so ``n_copies == 2``): row ``c*B + i`` is copy ``c`` of view ``i``. The copies of
a view are cached together: one entry per view stores the feature rows of all its copies,
``[n_copies, *F]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from hash3d_dg.cache.grid import CacheKey
from hash3d_dg.cache.table import Hash3DCache

log = logging.getLogger(__name__)

DEFAULT_TRAJECTORY_INTERVAL = 20


@runtime_checkable
class SplitDenoiser(Protocol):
    """Any model with a deep/shallow split (the UNet wrapper, or an oracle model in a benchmark).

    ``full`` returns ``(prediction [N, ...], feature [N, ...])``; ``shallow`` recomputes the
    prediction from the input and a feature; with the feature ``full`` returned for the same
    input it must return the same prediction.
    """

    def full(self, sample: Tensor, timestep: Any, context: Any) -> tuple[Tensor, Tensor]: ...

    def shallow(self, sample: Tensor, timestep: Any, context: Any, feature: Tensor) -> Tensor: ...


@dataclass
class UNetCallStats:
    """Per-view model calls: ``full_calls`` views computed fully, ``shallow_calls`` served from a
    cached feature (in grid-cache mode equal to the cache's hits)."""

    full_calls: int = 0
    shallow_calls: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _select_rows(obj: Any, rows: Tensor, n_rows: int, what: str) -> Any:
    """``obj`` restricted to batch ``rows`` (tensors with ``n_rows`` leading rows; containers
    recursively; None and scalars unchanged)."""
    if obj is None or isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, Tensor):
        if obj.dim() == 0 or (obj.dim() == 1 and obj.numel() == 1 and n_rows != 1):
            return obj
        if obj.shape[0] != n_rows:
            raise ValueError(f"{what} has {obj.shape[0]} rows, expected {n_rows} (one per sample row)")
        return obj.index_select(0, rows.to(obj.device))
    if isinstance(obj, dict):
        return {k: _select_rows(v, rows, n_rows, what) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_select_rows(v, rows, n_rows, what) for v in obj)
    raise TypeError(f"cannot split {what} of type {type(obj).__name__} by batch rows")


class CachedDenoiser:
    """Calls a ``SplitDenoiser``, serving views from cached features when the cache allows.

    Args:
        model: the split model.
        cache: the Hash3D grid cache; None computes every view fully.
        trajectory_interval: default interval of :meth:`trajectory` (else the cache config's,
            else 20).
    """

    def __init__(self, model: SplitDenoiser, cache: Hash3DCache | None = None,
                 trajectory_interval: int | None = None):
        self.model = model
        self.cache = cache
        if trajectory_interval is None:
            trajectory_interval = cache.cfg.trajectory_interval if cache is not None else DEFAULT_TRAJECTORY_INTERVAL
        if trajectory_interval < 1:
            raise ValueError(f"trajectory_interval must be >= 1, got {trajectory_interval}")
        self.trajectory_interval = int(trajectory_interval)
        self.stats = UNetCallStats()
        self.last_shallow: list[bool] = []  # per view of the last call: served shallow?
        self._traj: dict | None = None
        self._no_reuse = False

    def reset_stats(self) -> None:
        self.stats = UNetCallStats()

    def _rows(self, n_copies: int, n_views: int, views: list[int], device) -> Tensor:
        """Sample rows of ``views`` (all copies), on ``device``; uploaded once per pattern
        (a call then uploads nothing: the views and copies are host values)."""
        key = (n_copies, n_views, tuple(views), str(device))
        cache = self.__dict__.setdefault("_row_index", {})
        if key not in cache:
            from hash3d_dg.accel import upload

            cache[key] = upload([c * n_views + i for c in range(n_copies) for i in views],
                                device, torch.long)
        return cache[key]

    @contextmanager
    def no_reuse(self) -> Iterator["CachedDenoiser"]:
        """Inside the context every call runs fully and the table is neither read nor written."""
        previous, self._no_reuse = self._no_reuse, True
        try:
            yield self
        finally:
            self._no_reuse = previous

    def refine_reuse(self, stage2: str, interval: int | None = None):
        """The context one stage-2 refine call runs in for ``hash3d.stage2`` = ``stage2``:
        ``"trajectory"`` -> :meth:`trajectory`, ``"none"`` -> :meth:`no_reuse`, ``"cache"`` -> the
        grid cache as is. Without a cache (mode ``off``) always a plain context."""
        if self.cache is None or stage2 == "cache":
            return nullcontext(self)
        if stage2 == "trajectory":
            return self.trajectory(interval)
        if stage2 == "none":
            return self.no_reuse()
        raise ValueError(f"unknown stage-2 reuse {stage2!r}: expected cache, trajectory or none")

    # -- trajectory (DeepCache) mode -------------------------------------------------------------
    @contextmanager
    def trajectory(self, interval: int | None = None) -> Iterator["CachedDenoiser"]:
        """Inside the context successive calls are the steps of one denoising trajectory: step
        ``k`` with ``k % interval == 0`` runs fully and keeps its feature, the others run shallow
        from the kept feature (the grid cache is not used). A step whose batch shape differs from
        the kept feature's restarts the count with a full step."""
        if self._traj is not None:
            raise RuntimeError("CachedDenoiser.trajectory() contexts cannot be nested")
        interval = self.trajectory_interval if interval is None else int(interval)
        if interval < 1:
            raise ValueError(f"trajectory interval must be >= 1, got {interval}")
        self._traj = {"interval": interval, "step": 0, "feature": None, "shape": None}
        try:
            yield self
        finally:
            self._traj = None

    def _trajectory_feature(self, shape: tuple) -> Tensor | None:
        """The kept feature this trajectory step runs shallow from, or None: a full step."""
        st = self._traj
        assert st is not None
        if st["feature"] is None or st["shape"] != shape:
            st["step"] = 0
        return None if st["step"] % st["interval"] == 0 else st["feature"]

    def _trajectory_done(self, n_views: int, feature: Tensor | None = None, shape: tuple | None = None) -> None:
        """After a trajectory step: keep a full step's feature; count; advance."""
        st = self._traj
        if feature is not None:
            st["feature"], st["shape"] = feature.detach(), shape
            self.stats.full_calls += n_views
            self.last_shallow = [False] * n_views
        else:
            self.stats.shallow_calls += n_views
            self.last_shallow = [True] * n_views
        st["step"] += 1

    def _trajectory_step(self, sample: Tensor, timestep: Any, context: Any, n_views: int) -> Tensor:
        shape = tuple(sample.shape)
        kept = self._trajectory_feature(shape)
        if kept is None:
            out, feature = self.model.full(sample, timestep, context)
            self._trajectory_done(n_views, feature, shape)
        else:
            out = self.model.shallow(sample, timestep, context, kept)
            self._trajectory_done(n_views)
        return out

    # -- one path for every view of a call (the fused steps of ``guidance/step_graph.py``) -----
    def uniform(self, n_views: int) -> bool:
        """Whether every view of a call takes the same path (full or shallow): one view, a
        trajectory step, or no table to consult. Then ``decide`` / ``done`` replace the call's
        own bookkeeping for a caller that runs the model itself."""
        return n_views == 1 or self._traj is not None or self.cache is None or self._no_reuse

    def decide(self, keys: Sequence[CacheKey], view_query, shape: tuple, n_copies: int) -> Tensor | None:
        """For a ``uniform`` call: the feature rows ``[n_copies * B, *F]`` its views run shallow
        from, or None (full). The same host decisions, in the same order, as the call itself
        (the trajectory schedule, or the table's draws and lookups; ``shape``: the trajectory's
        batch-shape key)."""
        if self._traj is not None:
            return self._trajectory_feature(shape)
        if not self.consults_table(keys):
            return None
        hits = self.lookup(keys, view_query)
        return self.hit_rows(hits, list(range(len(keys))), n_copies) if hits else None

    def done(self, keys: Sequence[CacheKey], view_query, shape: tuple,
             feature: Tensor | None = None) -> None:
        """After a ``decide``-d call: a full call's ``feature`` (None after a shallow one) kept by the
        trajectory or inserted into the table; the counters."""
        if self._traj is not None:
            self._trajectory_done(len(keys), feature, shape)
        elif feature is not None:
            self.record_full(keys, view_query, feature)
        else:
            self.record_shallow(len(keys))

    # -- the table's side of a call (also used by a fused step, ``guidance/step_graph.py``) ----
    def consults_table(self, keys: Sequence[CacheKey] | None) -> bool:
        """Whether a call with ``keys`` goes through the grid cache (a table, keys, no trajectory
        and no ``no_reuse`` context); otherwise it computes every view fully."""
        return self.cache is not None and keys is not None and self._traj is None and not self._no_reuse

    def lookup(self, keys: Sequence[CacheKey], view_query) -> dict[int, Tensor]:
        """The views served from the table: ``{view: feature [n_copies, *F]}``. For each view in
        order, the table's Bernoulli(eta) draw and, when it says retrieve, the lookup with
        ``view_query(i)`` (called only then: the query may be computed lazily)."""
        cache = self.cache
        hit_features: dict[int, Tensor] = {}
        for i, key in enumerate(keys):
            if cache.should_retrieve():
                found = cache.retrieve(key, view_query(i))
                if found is not None:
                    hit_features[i] = found[0]
        return hit_features

    def record_full(self, keys: Sequence[CacheKey] | None, view_query, feature: Tensor) -> None:
        """After a full call of every view: each view's feature rows (``feature[i::B]``) into the
        table with ``view_query(i)`` (when the table is consulted), and the counters."""
        n_views = len(keys) if keys is not None else 1
        if self.consults_table(keys):
            feature = feature.detach()
            for i in range(n_views):
                self.cache.insert(keys[i], view_query(i), feature[i::n_views])
        self.stats.full_calls += n_views
        self.last_shallow = [False] * n_views

    def record_shallow(self, n_views: int) -> None:
        """After a shallow call of every view (each one a table hit): the counters."""
        self.stats.shallow_calls += n_views
        self.last_shallow = [True] * n_views

    @staticmethod
    def hit_rows(hit_features: dict[int, Tensor], hit_views: list[int], n_copies: int) -> Tensor:
        """The cached features of ``hit_views`` as shallow-path rows ``[n_copies * n_hit, *F]``
        (row ``c * n_hit + j``: copy ``c`` of hit view ``j``)."""
        feats = torch.stack([hit_features[i] for i in hit_views])  # [n_hit, n_copies, *F]
        if feats.shape[1] != n_copies:
            raise ValueError(f"cached feature holds {feats.shape[1]} copies, the batch has {n_copies}")
        return feats.transpose(0, 1).reshape(n_copies * len(hit_views), *feats.shape[2:])

    # -- the call ------------------------------------------------------------------------------
    def __call__(self, sample: Tensor, timestep: Any, context: Any,
                 keys: Sequence[CacheKey] | None = None, query: Tensor | None = None) -> Tensor:
        """Denoise ``sample``.

        Args:
            sample: ``[n_copies*B, ...]``; row ``c*B + i`` is copy ``c`` of view ``i``.
            timestep: scalar or per-row ``[n_copies*B]`` tensor (the key's timestep is in ``keys``).
            context: the model's conditioning; tensors with one row per sample row (containers of
                them allowed) are split with the batch.
            keys: one ``CacheKey`` per view (``B = len(keys)``); None disables caching for this
                call and counts it as one view.
            query: ``[B, *S]`` what retrieval compares (e.g. view ``i``'s noisy latent); default:
                the sample rows of view ``i`` stacked, ``[n_copies, ...]``.

        Returns:
            The prediction ``[n_copies*B, ...]`` in the input row order.
        """
        n_rows = sample.shape[0]
        n_views = len(keys) if keys is not None else 1
        if keys is not None and (n_views == 0 or n_rows % n_views != 0):
            raise ValueError(f"{n_rows} sample rows cannot be split into {n_views} views")
        if self._traj is not None:
            return self._trajectory_step(sample, timestep, context, n_views)
        if self.cache is None or keys is None or self._no_reuse:
            out, _ = self.model.full(sample, timestep, context)
            self.stats.full_calls += n_views
            self.last_shallow = [False] * n_views
            return out

        cache = self.cache
        n_copies = n_rows // n_views
        if query is not None and query.shape[0] != n_views:
            raise ValueError(f"query has {query.shape[0]} rows, expected one per view ({n_views})")

        def view_query(i: int) -> Tensor:
            return query[i] if query is not None else sample[i::n_views]

        hit_features = self.lookup(keys, view_query)
        full_views = [i for i in range(n_views) if i not in hit_features]
        hit_views = [i for i in range(n_views) if i in hit_features]

        def rows_of(views: list[int]) -> Tensor:
            return self._rows(n_copies, n_views, views, sample.device)

        outputs: list[Tensor] = []
        order: list[Tensor] = []
        if full_views and not hit_views:  # every row, in order: no gather
            out_f, feat_f = self.model.full(sample, timestep, context)
            self.record_full(keys, view_query, feat_f)
            return out_f
        if full_views:
            rows = rows_of(full_views)
            out_f, feat_f = self.model.full(sample.index_select(0, rows),
                                            _select_rows(timestep, rows, n_rows, "timestep"),
                                            _select_rows(context, rows, n_rows, "context"))
            feat_f = feat_f.detach()
            n_f = len(full_views)
            for j, i in enumerate(full_views):
                cache.insert(keys[i], view_query(i), feat_f[j::n_f])
            outputs.append(out_f)
            order.append(rows)
        if hit_views:
            rows = rows_of(hit_views)
            feats = self.hit_rows(hit_features, hit_views, n_copies)
            out_h = self.model.shallow(sample.index_select(0, rows),
                                       _select_rows(timestep, rows, n_rows, "timestep"),
                                       _select_rows(context, rows, n_rows, "context"),
                                       feats.to(sample.device))
            outputs.append(out_h)
            order.append(rows)
        self.stats.full_calls += len(full_views)
        self.stats.shallow_calls += len(hit_views)
        self.last_shallow = [i in hit_features for i in range(n_views)]

        if len(outputs) == 1 and not hit_views:
            return outputs[0]
        cat = torch.cat(outputs, dim=0)
        perm = torch.cat(order)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n_rows, device=perm.device)
        return cat.index_select(0, inverse)
