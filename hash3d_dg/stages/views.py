"""Novel-view sampling and per-stage guidance accounting shared by both stages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from hash3d_dg.errors import DivergenceError


@dataclass(frozen=True)
class NovelView:
    """A view relative to the reference camera, as Zero-1-to-3 is conditioned on it."""

    d_elevation: float
    d_azimuth: float
    d_radius: float = 0.0


def elevation_range(elevation: float, min_ver: float, max_ver: float) -> tuple[float, float]:
    """DreamGaussian's delta-elevation range, kept inside +-80 degrees of absolute elevation."""
    low = max(min(min_ver, min_ver - elevation), -80.0 - elevation)
    high = min(max(max_ver, max_ver - elevation), 80.0 - elevation)
    return low, high


def sample_novel_view(rng: np.random.Generator, elevation: float, min_ver: float,
                      max_ver: float) -> NovelView:
    """Delta elevation uniform in the kept range, delta azimuth uniform in [-180, 180)."""
    low, high = elevation_range(elevation, min_ver, max_ver)
    return NovelView(float(rng.uniform(low, high)), float(rng.uniform(-180.0, 180.0)), 0.0)


class GuidanceMeter:
    """Counts a stage's UNet calls and cache activity as the difference of two ``stats()``
    snapshots of the guidance (or zeros without one)."""

    def __init__(self, guidance) -> None:
        self.guidance = guidance
        self.start = self._snapshot()

    def _snapshot(self) -> dict:
        if self.guidance is None:
            return {"unet": {"full_calls": 0, "shallow_calls": 0},
                    "cache": {"attempts": 0, "hits": 0, "misses": 0, "inserts": 0, "evictions": 0,
                              "entries": 0, "bytes": 0, "hits_by_grid": []}}
        return self.guidance.stats()

    def hit_rate(self) -> float:
        now, start = self._snapshot()["unet"], self.start["unet"]
        shallow = now["shallow_calls"] - start["shallow_calls"]
        calls = now["full_calls"] - start["full_calls"] + shallow
        return shallow / calls if calls else 0.0

    def postfix(self, loss: float, **extra) -> dict:
        """What a stage's progress bar shows: the loss, ``extra``, and the cache hit rate."""
        postfix = {"loss": f"{loss:.4g}", **extra}
        if self.guidance is not None and self.guidance.cached:
            postfix["hit"] = f"{self.hit_rate():.0%}"
        return postfix

    def report(self) -> dict:
        now = self._snapshot()
        unet = {k: now["unet"][k] - self.start["unet"][k] for k in ("full_calls", "shallow_calls")}
        cache = {k: now["cache"][k] - self.start["cache"][k]
                 for k in ("attempts", "hits", "misses", "inserts", "evictions")}
        cache.update(entries=now["cache"]["entries"], bytes=now["cache"]["bytes"],
                     hits_by_grid=now["cache"]["hits_by_grid"])
        return {"unet": unet, "cache": cache}


def check_interval(device: torch.device | str) -> int:
    """How often a stage reads its loss and its divergence flags back from the device: every
    step on CPU (no transfer to wait for), every 10 steps on an accelerator (a read is a host
    sync that stalls the queue of kernels)."""
    from hash3d_dg.accel import is_accelerator

    return 10 if is_accelerator(device) else 1


class DivergenceGuard:
    """Watches a stage's loss, renders and gradients for NaN or inf without a host sync per step.

    ``observe_*`` only queue device work: each quantity keeps, on the device, the first step at
    which it was non-finite (``NEVER`` = not yet). ``check`` reads those three numbers back (one
    sync) and raises ``DivergenceError`` naming the stage, the iteration and the quantity; call it
    every ``check_interval`` steps and after the last one. Where several quantities failed, the
    earliest step wins; at one step the render is named before the loss it made non-finite,
    and the loss before its gradient.

    Launch cost per observation (what a GPU pays every iteration): one reduction to the largest
    magnitude (``vector_norm(ord=inf)``: NaN and inf propagate into it; the gradients: one
    ``_foreach_norm(inf)`` over every parameter's gradient, a ``stack`` and the same reduction),
    one comparison with inf (False for inf and NaN), one ``where`` (this step, or ``NEVER``) and
    one in-place minimum into the quantity's slot: 4 kernels, none of them per parameter.
    """

    QUANTITIES = ("render", "loss", "gradient")
    #: the first-bad-step value of a quantity that has stayed finite
    NEVER = torch.iinfo(torch.long).max

    def __init__(self, stage: str, device: torch.device | str) -> None:
        self.stage = stage
        self.first_bad = torch.full((len(self.QUANTITIES),), self.NEVER, dtype=torch.long, device=device)

    def _observe(self, index: int, step: int, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        largest = torch.linalg.vector_norm(values.detach(), ord=float("inf"))
        slot = self.first_bad[index:index + 1]
        slot.clamp_(max=torch.where(largest < float("inf"), self.NEVER, step))

    def observe_render(self, step: int, image: torch.Tensor) -> None:
        self._observe(0, step, image)

    def observe_loss(self, step: int, loss: torch.Tensor) -> None:
        self._observe(1, step, loss)

    def observe_gradients(self, step: int, params: Iterable[torch.Tensor]) -> None:
        grads = [p.grad.detach() for p in params if p.grad is not None and p.grad.numel() > 0]
        if grads:
            self._observe(2, step, torch.stack(torch._foreach_norm(grads, float("inf"))))

    def check(self) -> None:
        first = self.first_bad.tolist()
        failed = [(step, i) for i, step in enumerate(first) if step != self.NEVER]
        if failed:
            step, index = min(failed)
            raise DivergenceError(self.stage, step, self.QUANTITIES[index])
