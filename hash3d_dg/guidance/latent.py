"""The SD-VAE latent space both model guidances work in (Zero-1-to-3 and Stable Diffusion).

``LatentGuidance`` supplies ``ScoreDistillation``'s space hooks for a latent-diffusion model:
renders resized (bilinear) to ``image_size`` and encoded by the checkpoint's VAE (a posterior
sample from the guidance's generator, times the scaling factor) or by a tiny autoencoder
(TAESD: its deterministic latents, already in that space); decoding back to [0, 1]; the DDPM
forward process and w(t) = 1 - alpha_bar_t of the checkpoint's schedule; a DDIM scheduler for
refine. A subclass sets ``components`` (with ``vae``), ``latent_vae``, ``image_size``,
``device``, ``dtype``, ``scheduler``, ``refine_scheduler``, ``alphas_cumprod`` and
``scaling_factor`` (see ``_init_latent_space``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from hash3d_dg.guidance.base import ScoreDistillation


class LatentGuidance(ScoreDistillation):
    """``ScoreDistillation`` on SD-VAE latents (see the module docstring)."""

    def _init_latent_space(self, components, latent_vae, image_size: int) -> DDIMScheduler:
        """Set the latent-space attributes; returns the SDS scheduler (for its alphas)."""
        self.components = components
        self.latent_vae = latent_vae
        self.image_size = int(image_size)
        self.device = components.device
        self.dtype = components.dtype
        # SDS uses its own copy of the scheduler (only for add_noise / alphas); refine another.
        self.scheduler = DDIMScheduler.from_config(components.scheduler.config)
        self.refine_scheduler = DDIMScheduler.from_config(components.scheduler.config)
        self.scaling_factor = float(components.vae.config.scaling_factor)
        #: no-grad autoencoder calls (stage 2's encode and decode) replayed from CUDA graphs
        #: (``graphed.GraphedCalls``, set with ``guidance.cuda_graphs``); None: eager
        self.graph_calls = None
        #: the differentiable encode of stage 1's renders replayed from CUDA graphs
        #: (``graphed.GraphedAutograd``); None: eager
        self.grad_graph_calls = None
        return self.scheduler

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, image_size, image_size] float32 (bilinear)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return images

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable VAE encoding for SDS / refine.

        Args:
            images: [B, 3, H, W] in [0, 1] (any H, W; resized to ``image_size``).
        Returns:
            latents [B, 4, image_size/8, image_size/8] in the model dtype, a posterior sample
            multiplied by the VAE scaling factor (with a tiny autoencoder: its deterministic
            latents, already in that scaled space); gradients flow back to ``images``.
        """
        x = self._resize(images) * 2.0 - 1.0
        graphs = self.graph_calls if not torch.is_grad_enabled() else None
        if torch.is_grad_enabled() and x.requires_grad and self.grad_graph_calls is not None:
            graphs = self.grad_graph_calls  # stage 1's encode, forward and backward
        if self.latent_vae is not None:
            vae = self.latent_vae
            if graphs is not None:  # replayed from a CUDA graph
                latents = graphs("encode_tiny", lambda v: vae.encode(v).latents, x.to(vae.dtype))
                return latents.to(self.dtype) * float(vae.config.scaling_factor)
            return vae.encode(x.to(vae.dtype)).latents.to(self.dtype) * float(vae.config.scaling_factor)
        if graphs is not None:
            # the posterior's mean and std from the graph, its sample drawn outside it from the
            # guidance's generator, as DiagonalGaussianDistribution.sample draws it
            from diffusers.utils.torch_utils import randn_tensor

            def moments(v):
                dist = self.components.vae.encode(v).latent_dist
                return dist.mean, dist.std
            mean, std = graphs("encode_sd", moments, x.to(self.dtype))
            eps = randn_tensor(mean.shape, generator=self.generator, device=mean.device,
                               dtype=mean.dtype)
            return (mean + std * eps) * self.scaling_factor
        posterior = self.components.vae.encode(x.to(self.dtype)).latent_dist
        return posterior.sample(generator=self.generator) * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] float32 in [0, 1]."""
        graphs = self.graph_calls
        if self.latent_vae is not None:
            vae = self.latent_vae
            z = (latents / float(vae.config.scaling_factor)).to(vae.dtype)
            x = graphs("decode_tiny", lambda v: vae.decode(v).sample, z) if graphs is not None \
                else vae.decode(z).sample
            return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        z = (latents / self.scaling_factor).to(self.dtype)
        vae = self.components.vae
        x = graphs("decode_sd", lambda v: vae.decode(v).sample, z) if graphs is not None \
            else vae.decode(z).sample
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ the core's hooks

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_images(images)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(x)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        t_tensor = torch.full((x.shape[0],), t, device=self.device, dtype=torch.long)
        return self.add_noise_at(x, noise, t_tensor)

    def add_noise_at(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``add_noise`` at device timesteps t [B] (alpha_bar gathered on the device)."""
        return self.scheduler.add_noise(x, noise, t)

    def sds_weight(self, t: int) -> torch.Tensor:
        return 1.0 - self.alphas_cumprod[t]

    def sds_weight_at(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) [B, 1, 1, 1] at device timesteps t [B]: the same values as ``sds_weight``."""
        return 1.0 - self.alphas_cumprod[t].view(-1, 1, 1, 1)

    def make_refine_scheduler(self, steps: int) -> DDIMScheduler:
        self.refine_scheduler.set_timesteps(int(steps))  # host timesteps: read without a sync
        return self.refine_scheduler
