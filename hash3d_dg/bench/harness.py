"""Shared set-up for the compute and speed benchmarks: a reference view, a stand-in mesh for
stage 2, guidance models of a chosen size, and one call of the real stage loops."""

from __future__ import annotations

import time

import torch

from hash3d_dg.config import TINY_MODEL, RunConfig, build_config

UNET_SIZES = {
    # block_out_channels, layers_per_block, attention_head_dim, cross_attention_dim
    "tiny": None,  # the built-in tiny checkpoint's own UNet
    "small": dict(block_out_channels=[64, 128, 256], layers_per_block=2, attention_head_dim=8,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    "full": "stable-zero123",
}


def sample_reference(size: int, cfg: RunConfig, device):
    """The 'ball' sample as a ReferenceView of ``size`` pixels."""
    from hash3d_dg.eval.samples import render_sample
    from hash3d_dg.stages import ReferenceView

    return ReferenceView.from_rgba(render_sample("ball", size), cfg.elevation, cfg.radius, cfg.fovy,
                                   size, device)


def standin_mesh(texture_size: int = 64, subdivisions: int = 3, device="cpu"):
    """A UV-unwrapped icosphere of radius 0.5 with a grey albedo: stage 2's call counts and
    per-iteration cost do not depend on which mesh it refines."""
    import trimesh

    from hash3d_dg.mesh import Mesh

    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.5)
    mesh = Mesh(v=torch.tensor(sphere.vertices, dtype=torch.float32),
                f=torch.tensor(sphere.faces, dtype=torch.int64), vn=None, vt=None, ft=None,
                albedo=None).compute_normals().unwrap_uv()
    mesh.albedo = torch.full((texture_size, texture_size, 3), 0.7)
    return mesh.to(device)


def sized_guidance(cfg: RunConfig, device, dtype, unet_size: str = "tiny", vae_size: str = "tiny"):
    """Zero-1-to-3 guidance on random weights whose UNet/VAE have the asked-for size (timing and
    FLOP studies only); the rest of the tiny checkpoint (CLIP, scheduler) is reused."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from hash3d_dg.cache import CachedDenoiser, Hash3DCache
    from hash3d_dg.guidance.unet_split import UNetSplit
    from hash3d_dg.guidance import CLIPCameraProjection, Zero123Guidance, load_zero123
    from hash3d_dg.guidance.loading import resolve_vae_kind
    from hash3d_dg.guidance.tiny import (stable_zero123_unet_config, stable_zero123_vae_config,
                                         taesd_config, tiny_taesd_config, tiny_unet_config)
    from hash3d_dg.pipeline import tiny_model_dir

    components = load_zero123(str(tiny_model_dir("stable")), device=device, dtype=dtype, family="stable")
    torch.manual_seed(cfg.seed)
    if unet_size != "tiny":
        config = stable_zero123_unet_config() if unet_size == "full" else dict(tiny_unet_config(), **UNET_SIZES[unet_size])
        unet = UNet2DConditionModel(**config)
        dim = config["cross_attention_dim"]
        if dim != components.unet.config.cross_attention_dim:
            vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2,
                                      image_size=components.image_encoder.config.image_size,
                                      patch_size=components.image_encoder.config.patch_size,
                                      projection_dim=dim)
            components.image_encoder = CLIPVisionModelWithProjection(vision)
            components.camera_projection = CLIPCameraProjection(embedding_dim=dim, additional_embeddings=4)
        components.unet = unet
    if vae_size == "full":
        components.vae = AutoencoderKL(**stable_zero123_vae_config())
    for name in ("unet", "vae", "image_encoder", "camera_projection"):
        module = getattr(components, name)
        if any(p.dtype != dtype or p.device != torch.device(device) for p in module.parameters()):
            module = module.to(device=device, dtype=dtype)  # a freshly built, random module
        setattr(components, name, module.eval().requires_grad_(False))
    cache = Hash3DCache(cfg.hash3d, seed=cfg.seed) if cfg.hash3d.mode != "off" else None
    denoiser = CachedDenoiser(UNetSplit(components.unet, cfg.hash3d.cache_point), cache)
    latent_vae = None
    if resolve_vae_kind(cfg.guidance.vae, cfg.hash3d.mode) == "tiny":
        # a random AutoencoderTiny: TAESD's own architecture for a full-size VAE study, else tiny
        latent_vae = AutoencoderTiny(**(taesd_config() if vae_size == "full" else tiny_taesd_config()))
        latent_vae = latent_vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Zero123Guidance(components, denoiser=denoiser, guidance_scale=cfg.guidance.guidance_scale,
                           image_size=cfg.guidance.image_size, seed=cfg.seed, latent_vae=latent_vae)


def bench_config(mode: str, iters: int, iters_refine: int, size: int, image_size: int,
                 seed: int = 0, device: str = "cpu", **hash3d_overrides) -> RunConfig:
    values = {
        "seed": seed, "device": device,
        "guidance": {"model": TINY_MODEL, "image_size": image_size},
        "stage1": {"iters": iters, "ref_size": size, "num_pts": 1000,
                   "render_res": [size, size, size]},
        "stage2": {"iters": iters_refine, "render_res": size},
        "hash3d": {"mode": mode, **hash3d_overrides},
    }
    return build_config(values)


def run_stages(cfg: RunConfig, guidance, ref, mesh) -> dict:
    """Stage 1 then stage 2 (on ``mesh``) with the real loops; returns both reports."""
    from hash3d_dg.stages import run_stage1, run_stage2

    start = time.perf_counter()
    s1 = run_stage1(ref, cfg, guidance, progress=False)
    guidance.clear_cache()
    s2 = run_stage2(mesh, ref, cfg, guidance, progress=False)
    return {"stage1": s1.report, "stage2": s2.report, "seconds": time.perf_counter() - start}


def describe_machine() -> dict:
    import os
    import platform

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info

