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
    """Counts a stage's UNet calls and cache activity as the difference of two snapshots."""

    def __init__(self, guidance) -> None:
        self.guidance = guidance
        self.start = self._snapshot()

    def _snapshot(self) -> dict:
        if self.guidance is None:
            return {"full_calls": 0, "shallow_calls": 0, "attempts": 0, "hits": 0, "misses": 0,
                    "inserts": 0, "evictions": 0}
        denoiser = self.guidance.denoiser
        snap = {"full_calls": denoiser.stats.full_calls, "shallow_calls": denoiser.stats.shallow_calls}
        cache = denoiser.cache
        for key in ("attempts", "hits", "misses", "inserts", "evictions"):
            snap[key] = getattr(cache.stats, key) if cache is not None else 0
        return snap

    def hit_rate(self) -> float:
        now = self._snapshot()
        calls = (now["full_calls"] - self.start["full_calls"]) + (now["shallow_calls"] - self.start["shallow_calls"])
        return (now["shallow_calls"] - self.start["shallow_calls"]) / calls if calls else 0.0

    def postfix(self, loss: float, **extra) -> dict:
        """What a stage's progress bar shows: the loss, ``extra``, and the cache hit rate."""
        postfix = {"loss": f"{loss:.4g}", **extra}
        if self.guidance is not None and self.guidance.denoiser.cache is not None:
            postfix["hit"] = f"{self.hit_rate():.0%}"
        return postfix

    def report(self) -> dict:
        now = self._snapshot()
        delta = {k: now[k] - self.start[k] for k in now}
        cache = self.guidance.denoiser.cache if self.guidance is not None else None
        return {
            "unet": {"full_calls": delta["full_calls"], "shallow_calls": delta["shallow_calls"]},
            "cache": {
                "attempts": delta["attempts"], "hits": delta["hits"], "misses": delta["misses"],
                "inserts": delta["inserts"], "evictions": delta["evictions"],
                "entries": cache.stats.entries if cache is not None else 0,
                "bytes": cache.stats.bytes if cache is not None else 0,
                "hits_by_grid": list(cache.stats.hits_by_grid) if cache is not None else [],
            },
        }


def check_interval(device: torch.device | str) -> int:
    """How often a stage reads its loss and its divergence flags back from the device: every
    step on CPU (no transfer to wait for), every 10 steps on an accelerator (a read is a host
    sync that stalls the queue of kernels)."""
    return 1 if torch.device(device).type == "cpu" else 10


class DivergenceGuard:
    """Watches a stage's loss, renders and gradients for NaN or inf without a host sync per step.

    ``observe_*`` only queue device work: each quantity keeps, on the device, the first step at
    which it was non-finite (0 = never). ``check`` reads those three numbers back (one sync) and
    raises ``DivergenceError`` naming the stage, the iteration and the quantity; call it every
    ``check_interval`` steps and after the last one. Where several quantities failed, the
    earliest step wins; at one step the render is named before the loss it made non-finite,
    and the loss before its gradient.
    """

    QUANTITIES = ("render", "loss", "gradient")

    def __init__(self, stage: str, device: torch.device | str) -> None:
        self.stage = stage
        self.first_bad = torch.zeros(len(self.QUANTITIES), dtype=torch.long, device=device)

    def _observe(self, index: int, step: int, finite: torch.Tensor) -> None:
        current = self.first_bad[index]
        self.first_bad[index] = torch.where(~finite & (current == 0), step, current)

    def observe_render(self, step: int, image: torch.Tensor) -> None:
        self._observe(0, step, torch.isfinite(image.detach()).all())

    def observe_loss(self, step: int, loss: torch.Tensor) -> None:
        self._observe(1, step, torch.isfinite(loss.detach()).all())

    def observe_gradients(self, step: int, params: Iterable[torch.Tensor]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            self._observe(2, step, torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def check(self) -> None:
        first = self.first_bad.tolist()
        failed = [(step, i) for i, step in enumerate(first) if step > 0]
        if failed:
            step, index = min(failed)
            raise DivergenceError(self.stage, step, self.QUANTITIES[index])
