"""The guidance interface: what the stages, the pipeline and the apps may call on any guidance.

A guidance turns rendered views into an optimisation signal through a (cached) denoiser:

* ``set_reference(image, elevation)``: condition on the input view (an image guidance) or only
  record the reference elevation (a guidance that ignores the image);
* ``sds(images, d_elevation, d_azimuth, d_radius, step_ratio)``: the score-distillation loss of
  rendered novel views (stage 1);
* ``refine(images, d_elevation, d_azimuth, d_radius, strength, steps)``: a multi-step DDIM
  img2img target for rendered views (stage 2), run under the configured stage-2 reuse policy;
* ``reset(seed)``: as freshly built: an empty Hash3D table, reseeded generators, no reference;
* ``clear_cache()``: empty the Hash3D table (between stages);
* ``stats()``: counters of the denoiser calls and the table (a snapshot; stages report deltas).

``ScoreDistillation`` is the core every implementation shares: the timestep schedule (annealed
``round((1 - step_ratio) * T)`` clipped to ``[min_step, max_step]``, or uniform from the
guidance's generator), the noise draws, the weighting ``w(t) = 1 - alpha_bar_t``, the SDS loss
``0.5 * sum((x - stopgrad(x - w (eps_pred - eps)))^2)``, the DDIM img2img loop and the reuse
policy around it. An implementation supplies the space it works in and its model call:
``encode`` (differentiable, images -> x), ``decode`` (x -> images in [0, 1]), ``condition``
(the cameras -> whatever ``predict`` needs, computed once per call) and ``predict`` (x_t, t,
condition -> the guided noise prediction, float32). ``Zero123Guidance`` works on SD-VAE latents
with classifier-free guidance; the oracle benchmark's ``OracleGuidance`` on pixels.

Nothing outside ``guidance/`` and ``cache/`` touches a guidance's denoiser or table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

FloatSeq = Sequence[float] | torch.Tensor | np.ndarray

#: The counters ``stats()`` returns: ``{"unet": {...}, "cache": {...}}``.
CACHE_COUNTERS = ("attempts", "hits", "misses", "inserts", "evictions")


@runtime_checkable
class Guidance(Protocol):
    """The face of a guidance (see the module docstring)."""

    def set_reference(self, image: torch.Tensor | None, elevation: float) -> None: ...

    def sds(self, images: torch.Tensor, d_elevation: FloatSeq, d_azimuth: FloatSeq,
            d_radius: FloatSeq, step_ratio: float | None = None) -> torch.Tensor: ...

    def refine(self, images: torch.Tensor, d_elevation: FloatSeq, d_azimuth: FloatSeq,
               d_radius: FloatSeq, strength: float = 0.8, steps: int = 50) -> torch.Tensor: ...

    def reset(self, seed: int | None = None) -> None: ...

    def clear_cache(self) -> None: ...

    def stats(self) -> dict: ...


class ScoreDistillation:
    """The shared core of a guidance (see the module docstring).

    Args:
        denoiser: a ``CachedDenoiser`` (the model call goes through it, and with it the table).
        alphas_cumprod: ``[T]`` alpha_bar_t of the model's training schedule.
        min_step_ratio, max_step_ratio: timestep range as fractions of T (0.02, 0.98 -> [20, 980]).
        seed: seed of the guidance's generator (timesteps when not annealed, noise, posterior
            samples).
        generator_device: where the generator lives (the model's device for a model guidance).
        hash3d: the run's ``Hash3DConfig`` (the table ``reset`` builds, the stage-2 reuse
            policy); None: no table, plain refine.
        sds_scale: multiplies the SDS loss (1: the formula as written).
    """

    def __init__(self, denoiser, alphas_cumprod: torch.Tensor, min_step_ratio: float = 0.02,
                 max_step_ratio: float = 0.98, seed: int = 0,
                 generator_device: torch.device | str = "cpu", hash3d=None,
                 sds_scale: float = 1.0) -> None:
        self.denoiser = denoiser
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.min_step = int(self.num_train_timesteps * min_step_ratio)
        self.max_step = int(self.num_train_timesteps * max_step_ratio)
        if not 0 <= self.min_step <= self.max_step < self.num_train_timesteps:
            raise ValueError(f"bad timestep range [{self.min_step}, {self.max_step}]")
        self.hash3d = hash3d
        self.sds_scale = float(sds_scale)
        self.seed = int(seed)
        self.generator = torch.Generator(device=generator_device).manual_seed(self.seed)
        #: stage 1's SDS step after the encode replayed as one CUDA graph per path
        #: (``step_graph.SDSStepGraph``, set with ``guidance.cuda_graphs``); None: eager
        self.sds_step = None
        #: stage 2's DDIM refine step replayed as one CUDA graph per path
        #: (``step_graph.RefineStepGraph``); None: eager
        self.refine_step = None

    # ------------------------------------------------------------------ what an implementation supplies

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Rendered views [B, 3, H, W] in [0, 1] -> x (differentiable), the space SDS works in."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x -> images [B, 3, S, S] float32 in [0, 1]."""
        raise NotImplementedError

    def condition(self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq,
                  batch: int) -> Any:
        """What ``predict`` needs for ``batch`` views at these relative cameras (once per call)."""
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t: int, condition: Any) -> torch.Tensor:
        """The guided noise prediction for x_t at timestep t, float32, x_t's shape."""
        raise NotImplementedError

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) noise."""
        raise NotImplementedError

    def sds_weight(self, t: int):
        """w(t) = 1 - alpha_bar_t."""
        raise NotImplementedError

    def make_refine_scheduler(self, steps: int):
        """A DDIM scheduler with ``steps`` timesteps set, for one refine call."""
        raise NotImplementedError

    def _drop_reference(self) -> None:
        """Forget the reference conditioning (``reset``)."""

    # ------------------------------------------------------------------ the shared core

    def timestep_for(self, step_ratio: float | None) -> int:
        """SDS timestep: round((1 - step_ratio) * T) clipped to [min_step, max_step];
        ``None`` -> uniform in [min_step, max_step] from the guidance's generator."""
        if step_ratio is None:
            t = torch.randint(self.min_step, self.max_step + 1, (1,), generator=self.generator,
                              device=self.generator.device)
            return int(t.item())
        t = round((1.0 - float(step_ratio)) * self.num_train_timesteps)
        return int(min(max(t, self.min_step), self.max_step))

    def draw_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of ``like``'s shape (float32, on ``like``'s device) from the
        guidance's generator."""
        noise = torch.randn(like.shape, generator=self.generator, device=self.generator.device,
                            dtype=torch.float32)
        return noise.to(like.device)

    def sds(self, images: torch.Tensor, d_elevation: FloatSeq, d_azimuth: FloatSeq,
            d_radius: FloatSeq, step_ratio: float | None = None) -> torch.Tensor:
        """Score-distillation loss of rendered novel views.

        Args:
            images: [B, 3, H, W] in [0, 1] with grad.
            d_elevation, d_azimuth, d_radius: B relative cameras (degrees, degrees, radius).
            step_ratio: training progress in [0, 1] for the annealed timestep, or None (random).
        Returns:
            scalar float32 loss whose gradient w.r.t. x is ``sds_scale * w(t) (eps_pred - noise)``.
        """
        return self.sds_x(self.encode(images), d_elevation, d_azimuth, d_radius, step_ratio)

    def sds_x(self, x: torch.Tensor, d_elevation: FloatSeq, d_azimuth: FloatSeq,
              d_radius: FloatSeq, step_ratio: float | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """SDS loss on x (the encoded views, see ``sds``); ``noise`` overrides the generator's
        draw (the timestep is drawn first when ``step_ratio`` is None, then the noise)."""
        t = self.timestep_for(step_ratio)
        with torch.no_grad():
            noise = self.draw_noise(x) if noise is None else noise.to(x.device, torch.float32)
            if self.sds_step is not None and self.sds_step.applies(self, x):
                # the same computation, replayed from one graph per path (step_graph.py)
                grad = self.sds_step(self, x.detach().float(), noise, t, d_elevation, d_azimuth, d_radius)
            else:
                condition = self.condition(d_elevation, d_azimuth, d_radius, x.shape[0])
                x_t = self.add_noise(x.detach().float(), noise, t)
                eps = self.predict(x_t, t, condition)
                grad = torch.nan_to_num(self.sds_weight(t) * (eps - noise))
            target = x.detach().float() - grad
        loss = 0.5 * F.mse_loss(x.float(), target, reduction="sum")
        return loss if self.sds_scale == 1.0 else self.sds_scale * loss

    @torch.no_grad()
    def refine(self, images: torch.Tensor, d_elevation: FloatSeq, d_azimuth: FloatSeq,
               d_radius: FloatSeq, strength: float = 0.8, steps: int = 50) -> torch.Tensor:
        """Multi-step DDIM img2img of rendered views (DreamGaussian's stage-2 target).

        ``steps`` DDIM timesteps; starts at index ``int(steps * strength)`` (so strength 0.8 with
        50 steps runs the last 10 low-noise steps), adds noise at that timestep, then denoises
        through the denoiser under the stage-2 reuse policy (``hash3d.stage2``).

        Args:
            images: [B, 3, H, W] in [0, 1].
            strength: in [0, 1); larger means *less* noise added (DreamGaussian's convention).
        Returns:
            [B, 3, S, S] float32 in [0, 1].
        """
        if not 0.0 <= strength < 1.0:
            raise ValueError(f"strength must be in [0, 1), got {strength}")
        scheduler = self.make_refine_scheduler(int(steps))
        # The DDIM timesteps as host ints (the scheduler keeps them on the host): iterating a
        # device tensor would read each one back, a host sync per denoising step.
        timesteps = [int(t) for t in scheduler.timesteps.tolist()][int(steps * strength):]
        x = self.encode(images).float()
        noise = self.draw_noise(x)
        start = torch.full((x.shape[0],), timesteps[0], dtype=torch.long, device=x.device)
        x = scheduler.add_noise(x, noise, start)
        step = self.refine_step
        if step is not None and step.applies(self, scheduler, x):
            # each DDIM step (UNet, CFG, update) replayed from one graph per path (step_graph.py)
            batch = x.shape[0]
            tensors = self.step_tensors(d_elevation, d_azimuth, d_radius, batch)
            alphas = step.alphas(scheduler, x.device)
            indices = step.indices(scheduler, timesteps, x.device)
            with self._refine_reuse():
                for i, t in enumerate(timesteps):
                    keys = self.cache_keys(d_elevation, d_azimuth, d_radius, t, batch)
                    x = step(self, x, t, indices[i], alphas, tensors, keys)
            return self.decode(x)
        condition = self.condition(d_elevation, d_azimuth, d_radius, x.shape[0])
        with self._refine_reuse():
            for t in timesteps:
                eps = self.predict(x, t, condition)
                x = scheduler.step(eps, t, x).prev_sample.float()
        return self.decode(x)

    def _refine_reuse(self):
        if self.hash3d is None:
            return self.denoiser.refine_reuse("cache")
        return self.denoiser.refine_reuse(self.hash3d.stage2, self.hash3d.trajectory_interval)

    # ------------------------------------------------------------------ state

    def reset(self, seed: int | None = None) -> None:
        """As freshly built: an empty table (with its retrieval generator seeded), zero counters,
        the generator reseeded, no reference. ``seed`` None keeps the guidance's seed."""
        from hash3d_dg.cache import make_cache

        if seed is not None:
            self.seed = int(seed)
        if self.hash3d is not None:
            self.denoiser.cache = make_cache(self.hash3d, seed=self.seed)
        elif self.denoiser.cache is not None:
            self.denoiser.cache.clear()
        self.denoiser.reset_stats()
        self.denoiser.last_shallow = []
        self.generator.manual_seed(self.seed)
        self._drop_reference()

    def clear_cache(self) -> None:
        """Empty the Hash3D table (stage 2 starts with an empty one); counters keep counting."""
        if self.denoiser.cache is not None:
            self.denoiser.cache.clear()

    #: The model family a report names (None: not a checkpoint's).
    family: str | None = None

    @property
    def cached(self) -> bool:
        """Whether a Hash3D table serves this guidance's calls."""
        return self.denoiser.cache is not None

    def stats(self) -> dict:
        """A snapshot: ``{"unet": {"full_calls", "shallow_calls"}, "cache": {attempts, hits,
        misses, inserts, evictions, entries, bytes, hits_by_grid}}`` (zeros without a table)."""
        calls = self.denoiser.stats
        cache = self.denoiser.cache
        counters = {key: (getattr(cache.stats, key) if cache is not None else 0) for key in CACHE_COUNTERS}
        counters.update(entries=cache.stats.entries if cache is not None else 0,
                        bytes=cache.stats.bytes if cache is not None else 0,
                        hits_by_grid=list(cache.stats.hits_by_grid) if cache is not None else [])
        return {"unet": {"full_calls": int(calls.full_calls), "shallow_calls": int(calls.shallow_calls)},
                "cache": counters}
