"""Zero-1-to-3 guidance: reference conditioning, camera embeddings, SDS and multi-step refine.

Conventions (design.md section 4, as DreamGaussian uses Zero-1-to-3):

* Reference: the image at ``image_size`` -> CLIP processor -> ``image_embeds`` [1, 1, D]; its
  VAE latent is taken *unscaled* (``latent_dist.mode()``, not multiplied by the scaling factor).
* Camera embedding T [B, 4]: stable: [rad(d_el), sin(rad(d_az)), cos(rad(d_az)),
  rad(90 + input_elevation)]; xl: [rad(d_el), sin(rad(d_az)), cos(rad(d_az)), d_radius].
* UNet input: concat(noisy latent, reference latent) -> 8 channels; context:
  ``clip_camera_projection(concat(image_embeds, T))``. The classifier-free-guidance batch is
  ordered [cond views 0..B-1; uncond views 0..B-1]; the uncond rows use zeros for both the
  projected context and the reference latent. eps = uncond + s * (cond - uncond).
* SDS: t = round((1 - step_ratio) * 1000) clipped to [20, 980]; w(t) = 1 - alpha_bar_t;
  grad = w * (eps - noise); loss = 0.5 * sum((latents - stopgrad(latents - grad))^2).

Every UNet call goes through a ``CachedDenoiser`` (Hash3D), keyed per view by the relative
camera (d_azimuth, d_elevation, d_radius) and the integer timestep, with the noisy latents as
the retrieval query.

Randomness (VAE posterior samples, timesteps, noise) comes from one ``torch.Generator`` owned by
the guidance and seeded at construction, so runs are reproducible.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image

from hash3d_dg.accel import upload
from hash3d_dg.cache import CachedDenoiser, CacheKey
from hash3d_dg.guidance.base import FloatSeq
from hash3d_dg.guidance.latent import LatentGuidance
from hash3d_dg.guidance.unet_split import UNetSplit
from hash3d_dg.guidance.loading import Zero123Components

logger = logging.getLogger(__name__)


def _as_float64(values: FloatSeq, name: str, batch: int | None = None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        out = values.detach().to("cpu", torch.float64).reshape(-1)
    else:
        out = torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1))
    if batch is not None and out.numel() != batch:
        raise ValueError(f"{name} has {out.numel()} values for a batch of {batch} views")
    return out


class Zero123Guidance(LatentGuidance):
    """Zero-1-to-3 score distillation and img2img refine through a (cached) denoiser.

    The shared score-distillation core (timesteps, noise, w(t), the SDS loss, the DDIM refine
    loop, ``reset`` and ``stats``) is ``ScoreDistillation``'s and the SD-VAE latent space
    ``LatentGuidance``'s; this class supplies the classifier-free-guided Zero-1-to-3 call.

    Args:
        components: the loaded checkpoint (``load_zero123``).
        denoiser: the UNet wrapper every UNet call goes through; ``None`` builds an uncached
            ``CachedDenoiser(UNetSplit(components.unet), cache=None)``.
        guidance_scale: classifier-free guidance scale s (5 for stable-zero123).
        image_size: resolution the images are resized to before the VAE (256; latent = /8).
        min_step_ratio, max_step_ratio: timestep range as fractions of the training steps
            (0.02, 0.98 -> [20, 980]).
        seed: seed of the guidance's generator.
        latent_vae: a tiny autoencoder (diffusers ``AutoencoderTiny``, e.g. TAESD) for the latents
            of rendered views: the SDS encoding (stage 1) and the refine encode/decode (stage 2).
            None uses the checkpoint's own VAE. The reference latent that conditions the UNet
            always comes from the checkpoint's own VAE.
        hash3d: the run's ``Hash3DConfig`` (the table ``reset`` builds, the stage-2 reuse
            policy); None: the denoiser's table's own config.
    """

    def __init__(
        self,
        components: Zero123Components,
        denoiser: CachedDenoiser | None = None,
        guidance_scale: float = 5.0,
        image_size: int = 256,
        min_step_ratio: float = 0.02,
        max_step_ratio: float = 0.98,
        seed: int = 0,
        latent_vae: torch.nn.Module | None = None,
        hash3d=None,
    ) -> None:
        scheduler = self._init_latent_space(components, latent_vae, image_size)
        denoiser = denoiser if denoiser is not None else CachedDenoiser(UNetSplit(components.unet), cache=None)
        self.guidance_scale = float(guidance_scale)
        if hash3d is None and denoiser.cache is not None:
            hash3d = denoiser.cache.cfg
        super().__init__(denoiser, scheduler.alphas_cumprod, min_step_ratio, max_step_ratio,
                         seed=seed, generator_device=self.device, hash3d=hash3d)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.input_elevation = 0.0
        self.ref_embeddings: torch.Tensor | None = None  # [1, 1, D] CLIP image_embeds
        self.ref_latents: torch.Tensor | None = None  # [1, 4, h, w] unscaled VAE latent

    @property
    def family(self) -> str:
        return self.components.family

    def _drop_reference(self) -> None:
        self.ref_embeddings = self.ref_latents = None

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def set_reference(self, image: torch.Tensor, elevation: float) -> None:
        """Condition on the reference view.

        Args:
            image: [1, 3, H, W] in [0, 1], white background.
            elevation: the reference camera's elevation in degrees (orbit convention); used by
                the stable family's camera embedding.
        """
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"expected a reference image [1, 3, H, W], got {tuple(image.shape)}")
        x = self._resize(image).clamp(0.0, 1.0)
        # 8 bits by truncation, as DreamGaussian's torchvision ``to_pil_image`` (``mul(255).byte()``).
        pixels = x[0].mul(255.0).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        clip_in = self.components.feature_extractor(images=[Image.fromarray(pixels)], return_tensors="pt")
        pixel_values = clip_in["pixel_values"].to(self.device, self.dtype)
        embeds = self.components.image_encoder(pixel_values=pixel_values).image_embeds  # [1, D]
        self.ref_embeddings = embeds[:, None, :]
        self.ref_latents = self.components.vae.encode((x * 2.0 - 1.0).to(self.dtype)).latent_dist.mode()
        self.input_elevation = float(elevation)

    def camera_embedding(self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq) -> torch.Tensor:
        """Zero-1-to-3 camera embedding T [B, 4] (float32, on the guidance device).

        stable: [rad(d_el), sin(rad(d_az)), cos(rad(d_az)), rad(90 + input_elevation)];
        xl: [rad(d_el), sin(rad(d_az)), cos(rad(d_az)), d_radius].
        """
        el = _as_float64(d_elevation, "d_elevation")
        az = _as_float64(d_azimuth, "d_azimuth", el.numel())
        radius = _as_float64(d_radius, "d_radius", el.numel())
        az_rad = torch.deg2rad(az)
        if self.family == "stable":
            last = torch.full_like(el, math.radians(90.0 + self.input_elevation))
        else:
            last = radius
        # built on the host in float64, then one pinned, non-blocking upload (accel.upload)
        return upload(torch.stack([torch.deg2rad(el), torch.sin(az_rad), torch.cos(az_rad), last], dim=-1),
                      self.device, torch.float32)

    @torch.no_grad()
    def conditioning(
        self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG conditioning for B views, ordered [cond; uncond].

        Returns:
            context [2B, 1, D] (rows B.. are zeros) and image latents [2B, 4, h, w] (the unscaled
            reference latent for rows ..B, zeros for rows B..), both in the model dtype.
        """
        if self.ref_embeddings is None or self.ref_latents is None:
            raise RuntimeError("call set_reference(image, elevation) before using the guidance")
        cam = self.camera_embedding(d_elevation, d_azimuth, d_radius)  # [B, 4]
        return self.conditioning_from(cam, self.ref_embeddings, self.ref_latents)

    def conditioning_from(self, cam: torch.Tensor, ref_embeddings: torch.Tensor,
                          ref_latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``conditioning`` from the camera embedding [B, 4] and the reference's CLIP embedding and
        latent: device ops only (what the fused SDS step's graph runs)."""
        batch = cam.shape[0]
        embed = torch.cat([ref_embeddings.expand(batch, 1, -1), cam[:, None, :].to(self.dtype)], dim=-1)
        cond = self.components.camera_projection(embed)  # [B, 1, D]
        context = torch.cat([cond, torch.zeros_like(cond)], dim=0)
        lat = ref_latents.expand(batch, -1, -1, -1)
        image_latents = torch.cat([lat, torch.zeros_like(lat)], dim=0)
        return context, image_latents

    # ------------------------------------------------------------------ noise prediction

    @torch.no_grad()
    def predict_noise(
        self,
        noisy_latents: torch.Tensor,
        timestep: int,
        conditioning: tuple[torch.Tensor, torch.Tensor],
        d_elevation: FloatSeq,
        d_azimuth: FloatSeq,
        d_radius: FloatSeq,
    ) -> torch.Tensor:
        """Classifier-free-guided noise prediction through the denoiser.

        Args:
            noisy_latents: [B, 4, h, w] (scaled latent space).
            timestep: integer diffusion timestep shared by the batch.
            conditioning: ``self.conditioning(...)`` for the same B views.
            d_elevation, d_azimuth, d_radius: the B relative cameras (cache keys).
        Returns:
            eps_uncond + s * (eps_cond - eps_uncond), [B, 4, h, w] float32.
        """
        context, image_latents = conditioning
        batch = noisy_latents.shape[0]
        x = noisy_latents.to(self.dtype)
        sample = self.unet_sample(x, image_latents)
        t_in = torch.full((2 * batch,), int(timestep), device=self.device, dtype=torch.long)
        keys = self.cache_keys(d_elevation, d_azimuth, d_radius, timestep, batch)
        out = self.denoiser(sample, t_in, context, keys=keys, query=x)
        return self.guide(out)

    @staticmethod
    def unet_sample(x: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
        """The UNet input [2B, 8, h, w]: the noisy latents x [B, 4, h, w] (model dtype) for the
        cond and the uncond rows, concatenated with the image latents along channels."""
        return torch.cat([torch.cat([x, x], dim=0), image_latents], dim=1)

    def guide(self, out: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance of the UNet's [cond; uncond] prediction, float32."""
        eps_cond, eps_uncond = out.float().chunk(2, dim=0)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    @staticmethod
    def cache_keys(d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq, timestep: int,
                   batch: int) -> list[CacheKey]:
        """One Hash3D key per view: the relative camera and the timestep."""
        el = _as_float64(d_elevation, "d_elevation", batch).tolist()
        az = _as_float64(d_azimuth, "d_azimuth", batch).tolist()
        rad = _as_float64(d_radius, "d_radius", batch).tolist()
        return [CacheKey(azimuth=a, elevation=e, radius=r, timestep=float(timestep)) for a, e, r in zip(az, el, rad)]

    # ------------------------------------------------------------------ the fused SDS step (step_graph.py)

    def step_tensors(self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq,
                     batch: int) -> list[torch.Tensor]:
        """What the fused step's graph reads per call besides x, the noise and t: the camera
        embedding (one upload) and the reference's embedding and latent."""
        if self.ref_embeddings is None or self.ref_latents is None:
            raise RuntimeError("call set_reference(image, elevation) before using the guidance")
        cam = self.camera_embedding(d_elevation, d_azimuth, d_radius)
        if cam.shape[0] != batch:
            raise ValueError(f"{cam.shape[0]} cameras for {batch} images")
        return [cam, self.ref_embeddings, self.ref_latents]

    def step_model_inputs(self, x: torch.Tensor, t: torch.Tensor, cam: torch.Tensor,
                          ref_embeddings: torch.Tensor, ref_latents: torch.Tensor):
        """(sample, timestep [2B], context) of the UNet call for noisy latents x (model dtype) at
        the device timesteps t [B]: the same ops as ``conditioning`` + ``predict_noise``."""
        context, image_latents = self.conditioning_from(cam, ref_embeddings, ref_latents)
        return self.unet_sample(x, image_latents), torch.cat([t, t]), context

    def step_guide(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.guide(out)

    # ------------------------------------------------------------------ the core's hooks

    def condition(self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq, batch: int):
        cond = self.conditioning(d_elevation, d_azimuth, d_radius)
        if cond[0].shape[0] != 2 * batch:
            raise ValueError(f"{cond[0].shape[0] // 2} cameras for {batch} images")
        return cond, d_elevation, d_azimuth, d_radius

    def predict(self, x_t: torch.Tensor, t: int, condition) -> torch.Tensor:
        cond, d_elevation, d_azimuth, d_radius = condition
        return self.predict_noise(x_t, t, cond, d_elevation, d_azimuth, d_radius)

    def sds_latents(
        self,
        latents: torch.Tensor,
        d_elevation: FloatSeq,
        d_azimuth: FloatSeq,
        d_radius: FloatSeq,
        step_ratio: float | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SDS loss on scaled latents [B, 4, h, w] (``sds`` after the encoding).

        ``noise`` [B, 4, h, w] overrides the generator's draw (the timestep is drawn first when
        ``step_ratio`` is None, then the noise).
        """
        return self.sds_x(latents, d_elevation, d_azimuth, d_radius, step_ratio=step_ratio, noise=noise)
