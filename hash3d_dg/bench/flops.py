"""FLOP/MAC accounting on the meta device: real architectures, no weights, no memory.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per
multiply-accumulate of matmuls and convolutions) and reported as GMACs = FLOPs / 2e9.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from hash3d_dg.cache.config import CACHE_POINTS, NAMED_CACHE_POINTS


def count_gmacs(fn, *args, **kwargs) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() / 2e9


def meta_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    from hash3d_dg.guidance.tiny import stable_zero123_unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**(config or stable_zero123_unet_config())).eval()


def meta_vae(config: dict | None = None):
    from diffusers import AutoencoderKL

    from hash3d_dg.guidance.tiny import stable_zero123_vae_config

    with torch.device("meta"):
        return AutoencoderKL(**(config or stable_zero123_vae_config())).eval()


def unet_inputs(unet, batch: int, latent_size: int):
    cfg = unet.config
    sample = torch.empty(batch, cfg.in_channels, latent_size, latent_size, device="meta")
    timestep = torch.full((batch,), 500, dtype=torch.long, device="meta")
    context = torch.empty(batch, 1, cfg.cross_attention_dim, device="meta")
    return sample, timestep, context


def meta_taesd(config: dict | None = None):
    from diffusers import AutoencoderTiny

    from hash3d_dg.guidance.tiny import taesd_config

    with torch.device("meta"):
        return AutoencoderTiny(**(config or taesd_config())).eval()


@lru_cache(maxsize=4)
def unet_gmacs(image_size: int = 256, batch: int = 2) -> dict:
    """Full and shallow (per named cache point) UNet GMACs for a batch (2 = one CFG pair)."""
    unet = meta_unet()
    with torch.no_grad():
        sample, timestep, context = unet_inputs(unet, batch, image_size // 8)
        full = count_gmacs(unet, sample, timestep, encoder_hidden_states=context)
    return {"full": full, "shallow_by_point": {p: shallow_gmacs(p, image_size, batch) for p in CACHE_POINTS}}


@lru_cache(maxsize=16)
def shallow_gmacs(point, image_size: int = 256, batch: int = 2) -> float:
    """Shallow-path GMACs of the stable-zero123 UNet at ``point`` (a name or a ``(u, s)`` tuple)."""
    from hash3d_dg.guidance.unet_split import UNetSplit

    unet = meta_unet()
    sample, timestep, context = unet_inputs(unet, batch, image_size // 8)
    with torch.no_grad():
        split = UNetSplit(unet, point if isinstance(point, str) else tuple(point))
        _, feature = split.full(sample, timestep, context)
        return count_gmacs(split.shallow, sample, timestep, context, feature)


def encode_backward_gmacs(vae, image_size: int = 256) -> float:
    """MACs of back-propagating through a frozen encoder (input gradients only): the counted
    forward+backward minus the forward."""
    image = torch.empty(1, 3, image_size, image_size, device="meta", requires_grad=True)

    def encode(x):
        out = vae.encode(x)
        return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents

    def forward_backward():
        latent = encode(image)
        latent.backward(torch.empty_like(latent))

    vae.requires_grad_(False)
    total = count_gmacs(forward_backward)
    with torch.no_grad():
        forward = count_gmacs(encode, image)
    return total - forward


def autoencoder_gmacs(vae, image_size: int) -> dict:
    """An autoencoder's GMACs: encoder forward and input-gradient backward at ``image_size``,
    decoder at the matching latent."""
    image = torch.empty(1, 3, image_size, image_size, device="meta")
    latent = torch.empty(1, vae.config.latent_channels, image_size // 8, image_size // 8, device="meta")
    with torch.no_grad():
        encode = count_gmacs(vae.encode, image)
        decode = count_gmacs(vae.decode, latent)
    return {"encode": encode, "encode_backward": encode_backward_gmacs(vae, image_size), "decode": decode}


@lru_cache(maxsize=4)
def taesd_gmacs(image_size: int = 256) -> dict:
    """TAESD (diffusers ``AutoencoderTiny``, ``madebyollin/taesd`` architecture) GMACs: encoder
    forward and input-gradient backward at ``image_size``, decoder at the matching latent."""
    return autoencoder_gmacs(meta_taesd(), image_size)


@lru_cache(maxsize=4)
def vae_gmacs(image_size: int = 256) -> dict:
    vae = meta_vae()
    image = torch.empty(1, 3, image_size, image_size, device="meta")
    latent = torch.empty(1, vae.config.latent_channels, image_size // 8, image_size // 8, device="meta")
    with torch.no_grad():
        encode = count_gmacs(vae.encode, image)
        decode = count_gmacs(vae.decode, latent)
    return {"encode": encode, "decode": decode}


def unet_report_fields(unet: dict, image_size: int, cache_point: str) -> dict:
    """The UNet's part of a ``bench flops`` report (either task): sizes, the CFG-pair full pass
    and the shallow path at ``cache_point`` and at every named point, from ``unet`` (a
    ``unet_gmacs``-shaped dict of one model at batch 2)."""
    shallow = unet["shallow_by_point"]
    return {
        "image_size": image_size,
        "latent_size": image_size // 8,
        "unet_batch": 2,
        "unet_full_gmacs": round(unet["full"], 3),
        "unet_shallow_gmacs": round(shallow[cache_point], 3),
        "unet_shallow_cache_point": cache_point,
        "unet_shallow_gmacs_by_point": {k: round(v, 3) for k, v in shallow.items()},
        "unet_shallow_fraction_by_point": {k: round(v / unet["full"], 4) for k, v in shallow.items()},
        "cache_point_pairs": {k: list(v) for k, v in NAMED_CACHE_POINTS.items()},
    }


def flops_report(image_size: int = 256, cache_point: str = "paper") -> dict:
    """The numbers `python -m hash3d_dg.bench flops` prints."""
    vae = vae_gmacs(image_size)
    return {
        "architecture": "stable-zero123 (SD-1.x UNet, in_channels 8, cross-attention 768) + SD VAE",
        **unet_report_fields(unet_gmacs(image_size, 2), image_size, cache_point),
        "vae_encode_gmacs": round(vae["encode"], 3),
        "vae_decode_gmacs": round(vae["decode"], 3),
        "tiny_vae_gmacs": {k: round(v, 3) for k, v in taesd_gmacs(image_size).items()},
        "tiny_vae": "TAESD architecture (diffusers AutoencoderTiny, madebyollin/taesd config)",
        "counter": "torch.utils.flop_counter.FlopCounterMode on the meta device; GMACs = FLOPs / 2e9",
    }


def add_arguments(p) -> None:
    p.add_argument("--task", default="image", choices=["image", "text"],
                   help="image: stable-zero123 at 256 px; text: Stable Diffusion 2.1-base at 512 px (bench.text_costs)")
    p.add_argument("--image-size", type=int, default=None, help="default: 256 (image), 512 (text)")
    p.add_argument("--cache-point", default="paper", choices=list(CACHE_POINTS))


def run_from_args(args) -> dict:
    """The image task (``--task text`` is ``text_costs.run_flops_from_args``: see ``bench.__main__``)."""
    return flops_report(args.image_size or 256, args.cache_point)
