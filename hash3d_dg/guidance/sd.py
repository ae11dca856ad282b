"""Stable Diffusion guidance (text to 3D): the second implementation of the guidance interface.

Conventions (DreamGaussian's ``guidance/sd_utils.py``, ``StableDiffusion``):

* The prompt and the negative prompt are encoded once (``set_prompt``): CLIP tokenizer padded to
  its ``model_max_length`` (77), the text encoder's last hidden state [1, 77, D]. A prompt longer
  than 77 tokens is truncated with one warning line (DreamGaussian would fail on it).
* Classifier-free guidance batch [cond views 0..B-1; uncond views 0..B-1] with contexts
  [prompt; negative prompt]; eps = uncond + s (cond - uncond), s = 100 for SDS and refine.
* Renders are resized (bilinear) to 512 px before the VAE; SDS, refine, w(t) and the timestep
  schedule are ``ScoreDistillation``'s (t in [20, 980] of 1000, annealed; ``nan_to_num`` on the
  gradient); refine is img2img at 512 px with DDIM under the same strength schedule.
* A v-prediction checkpoint (SD 2.x at 768 px) is served by converting its output to eps
  (eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t), so SDS and DDIM see eps either way.

Cameras. A prompt has no reference view; the stages still pass views relative to the training
camera (elevation ``set_reference(None, elevation)``, azimuth 0, radius ``radius``), so the
views are absolute: azimuth 0 faces +z with +y up (the export frame). The model is not
conditioned on the camera; the Hash3D table is keyed by the sampled camera's absolute
(azimuth, elevation, radius) and the timestep, with the noisy latent as the retrieval query.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from hash3d_dg.cache import CachedDenoiser, CacheKey
from hash3d_dg.guidance.base import FloatSeq
from hash3d_dg.guidance.latent import LatentGuidance
from hash3d_dg.guidance.sd_loading import SDComponents
from hash3d_dg.guidance.unet_split import UNetSplit
from hash3d_dg.prompts import clean_prompt

logger = logging.getLogger(__name__)


def _floats(values: FloatSeq, name: str, batch: int) -> list[float]:
    if isinstance(values, torch.Tensor):
        out = values.detach().to("cpu", torch.float64).reshape(-1).tolist()
    else:
        out = np.asarray(values, dtype=np.float64).reshape(-1).tolist()
    if len(out) != batch:
        raise ValueError(f"{name} has {len(out)} values for a batch of {batch} views")
    return out


class StableDiffusionGuidance(LatentGuidance):
    """Stable Diffusion score distillation and img2img refine through a (cached) denoiser.

    Args:
        components: the loaded checkpoint (``load_stable_diffusion``).
        denoiser: the UNet wrapper every UNet call goes through; None builds an uncached one.
        guidance_scale: classifier-free guidance scale (DreamGaussian: 100).
        image_size: renders are resized to this before the VAE (512; latent = /8).
        min_step_ratio, max_step_ratio: timestep range as fractions of the training steps.
        seed: seed of the guidance's generator (posterior samples, timesteps, noise).
        latent_vae: a tiny autoencoder (TAESD) for the renders' latents, or None (the SD VAE).
        hash3d: the run's ``Hash3DConfig``; None: the denoiser's table's own config.
        radius: the training camera's radius (the absolute radius of a view is this + d_radius).
    """

    def __init__(self, components: SDComponents, denoiser: CachedDenoiser | None = None,
                 guidance_scale: float = 100.0, image_size: int = 512, min_step_ratio: float = 0.02,
                 max_step_ratio: float = 0.98, seed: int = 0, latent_vae: torch.nn.Module | None = None,
                 hash3d=None, radius: float = 2.5) -> None:
        scheduler = self._init_latent_space(components, latent_vae, image_size)
        # The UNet's output is turned into eps (predict), so the refine steps read eps.
        if self.refine_scheduler.config.get("prediction_type", "epsilon") != "epsilon":
            self.refine_scheduler.register_to_config(prediction_type="epsilon")
        denoiser = denoiser if denoiser is not None else CachedDenoiser(UNetSplit(components.unet), cache=None)
        if hash3d is None and denoiser.cache is not None:
            hash3d = denoiser.cache.cfg
        super().__init__(denoiser, scheduler.alphas_cumprod, min_step_ratio, max_step_ratio,
                         seed=seed, generator_device=self.device, hash3d=hash3d)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.guidance_scale = float(guidance_scale)
        self.radius = float(radius)
        self.elevation = 0.0
        self.v_prediction = components.prediction_type == "v_prediction"
        self.prompt: str | None = None
        self.negative_prompt = ""
        self.embeddings: dict[str, torch.Tensor] = {}  # "pos", "neg": [1, L, D]
        self.truncated = False

    @property
    def family(self) -> str:
        return self.components.family

    # ------------------------------------------------------------------ conditioning

    def _drop_reference(self) -> None:
        self.prompt, self.negative_prompt, self.embeddings, self.truncated = None, "", {}, False

    def set_reference(self, image: torch.Tensor | None, elevation: float) -> None:
        """Record the training camera's elevation; a text guidance takes no image."""
        if image is not None:
            raise ValueError("the Stable Diffusion guidance is conditioned on a prompt, not an image")
        self.elevation = float(elevation)

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` with the start and end tokens (what the 77 limit counts)."""
        return len(self.components.tokenizer(prompt, truncation=False, verbose=False).input_ids)

    @torch.no_grad()
    def encode_text(self, prompt: str) -> torch.Tensor:
        """[1, L, D] last hidden state of the text encoder (L = the tokenizer's max length)."""
        tok = self.components.tokenizer
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return self.components.text_encoder(ids.to(self.device))[0].to(self.dtype)

    @torch.no_grad()
    def set_prompt(self, prompt: str, negative_prompt: str = "") -> None:
        """Encode the prompt and the negative prompt once (the CFG contexts of every call).

        Raises:
            InputError: an empty or whitespace-only prompt.
        """
        prompt = clean_prompt(prompt)
        negative_prompt = " ".join(str(negative_prompt or "").split())
        limit = int(self.components.tokenizer.model_max_length)
        self.truncated = False
        for what, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            count = self.token_count(text)
            if count > limit:
                self.truncated = True
                logger.warning("warning: the %s is %d tokens long; the tokenizer keeps %d: truncated", what, count, limit)
        self.embeddings = {"pos": self.encode_text(prompt), "neg": self.encode_text(negative_prompt)}
        self.prompt, self.negative_prompt = prompt, negative_prompt

    def condition(self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq, batch: int):
        """(context [2B, L, D] ordered [prompt x B; negative x B], the B views' absolute cameras)."""
        if not self.embeddings:
            raise RuntimeError("call set_prompt(prompt, negative_prompt) before using the guidance")
        context = self.context_from(batch, self.embeddings["pos"], self.embeddings["neg"])
        return context, self.cameras(d_elevation, d_azimuth, d_radius, batch)

    def cameras(self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq,
                batch: int) -> list[tuple[float, float, float]]:
        """The B views' absolute (azimuth, elevation, radius)."""
        el = _floats(d_elevation, "d_elevation", batch)
        az = _floats(d_azimuth, "d_azimuth", batch)
        rad = _floats(d_radius, "d_radius", batch)
        return [(a, self.elevation + e, self.radius + r) for e, a, r in zip(el, az, rad)]

    @staticmethod
    def context_from(batch: int, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """The CFG context [2B, L, D]: the prompt's embedding B times, then the negative's."""
        return torch.cat([pos.expand(batch, -1, -1), neg.expand(batch, -1, -1)], dim=0)

    def cache_keys(self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq,
                   timestep: int, batch: int) -> list[CacheKey]:
        """One Hash3D key per view: the absolute camera and the timestep."""
        return self._keys(self.cameras(d_elevation, d_azimuth, d_radius, batch), timestep)

    @staticmethod
    def _keys(cameras, timestep: int) -> list[CacheKey]:
        return [CacheKey(azimuth=a, elevation=e, radius=r, timestep=float(timestep)) for a, e, r in cameras]

    # ------------------------------------------------------------------ noise prediction

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, t: int, condition) -> torch.Tensor:
        """Classifier-free-guided eps for x_t [B, 4, h, w] at timestep t, float32."""
        context, cameras = condition
        batch = x_t.shape[0]
        x = x_t.to(self.dtype)
        sample = torch.cat([x, x], dim=0)
        t_in = torch.full((2 * batch,), int(t), device=self.device, dtype=torch.long)
        out = self.denoiser(sample, t_in, context, keys=self._keys(cameras, t), query=x)
        alpha_bar = self.alphas_cumprod[int(t)] if self.v_prediction else None
        return self._guide(out, x_t, alpha_bar)

    def _guide(self, out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor | None) -> torch.Tensor:
        """CFG of the [prompt; negative] prediction, float32; a v-prediction turned into eps."""
        cond, uncond = out.float().chunk(2, dim=0)
        guided = uncond + self.guidance_scale * (cond - uncond)
        if self.v_prediction:
            guided = alpha_bar.sqrt() * guided + (1.0 - alpha_bar).sqrt() * x_t.float()
        return guided

    # ------------------------------------------------------------------ the fused SDS step (step_graph.py)

    def step_tensors(self, d_elevation: FloatSeq, d_azimuth: FloatSeq, d_radius: FloatSeq,
                     batch: int) -> list[torch.Tensor]:
        """What the fused step's graph reads per call besides x, the noise and t: the prompt's and
        the negative prompt's embeddings."""
        if not self.embeddings:
            raise RuntimeError("call set_prompt(prompt, negative_prompt) before using the guidance")
        return [self.embeddings["pos"], self.embeddings["neg"]]

    def step_model_inputs(self, x: torch.Tensor, t: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
        """(sample, timestep [2B], context) of the UNet call for noisy latents x (model dtype) at
        the device timesteps t [B]: the same ops as ``condition`` + ``predict``."""
        return torch.cat([x, x], dim=0), torch.cat([t, t]), self.context_from(x.shape[0], pos, neg)

    def step_guide(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1) if self.v_prediction else None
        return self._guide(out, x_t, alpha_bar)

    def sds_latents(self, latents: torch.Tensor, d_elevation: FloatSeq, d_azimuth: FloatSeq,
                    d_radius: FloatSeq, step_ratio: float | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
        """SDS loss on scaled latents [B, 4, h, w] (``sds`` after the encoding)."""
        return self.sds_x(latents, d_elevation, d_azimuth, d_radius, step_ratio=step_ratio, noise=noise)


def build_sd_guidance(cfg, device: torch.device, dtype: torch.dtype, components: SDComponents | None = None
                      ) -> StableDiffusionGuidance:
    """The Stable Diffusion guidance of a run config (``guidance.type=sd``), its UNet wrapped by
    the Hash3D cache of ``cfg.hash3d`` (none for mode off). ``components``: an already loaded
    checkpoint to wrap instead of loading ``cfg.guidance.model`` (``builtin:tiny``: the built-in
    tiny random checkpoint)."""
    from hash3d_dg.cache import make_cache
    from hash3d_dg.guidance.acceleration import accelerate
    from hash3d_dg.guidance.loading import load_latent_vae
    from hash3d_dg.guidance.sd_loading import load_stable_diffusion, tiny_sd_model_dir

    if components is None:
        model = cfg.guidance.model
        if model == "builtin:tiny":
            model = str(tiny_sd_model_dir())
        components = load_stable_diffusion(model, device=device, dtype=dtype)
    denoiser = CachedDenoiser(UNetSplit(components.unet, cfg.hash3d.cache_point), make_cache(cfg.hash3d, seed=cfg.seed))
    latent_vae = load_latent_vae(cfg.guidance, cfg.hash3d.mode, device, dtype)
    guidance = StableDiffusionGuidance(components, denoiser=denoiser, guidance_scale=cfg.guidance.guidance_scale,
                                       image_size=cfg.guidance.image_size, seed=cfg.seed, latent_vae=latent_vae,
                                       hash3d=cfg.hash3d, radius=cfg.radius)
    accelerate(guidance, cfg.guidance, device)  # channels_last, CUDA graphs (auto: on CUDA)
    return guidance
