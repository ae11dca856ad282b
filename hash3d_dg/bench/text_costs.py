"""Compute of the text path (Stable Diffusion 2.1 guidance), as ``flops.py`` / ``macs.py`` do for
the image path.

GMACs per call come from the real SD 2.1(-base) architectures on the meta device (no weights):
the UNet's classifier-free-guidance pair at 64x64 latents with a 77-token, 1024-wide context,
full and shallow at each named cache point; the SD VAE encoder forward and input-gradient
backward at 512 px, its decoder at 64x64; TAESD's at the same sizes; the text encoder (once per
prompt). Call counts come from the real stage loops in text mode (no reference view) with the
built-in tiny SD checkpoint at a small render size: hits depend on the view / timestep sampling
and the table, not on the weights.

Hash3D's paper reports a 1.5x speed-up for its text-to-3D GaussianDreamer (wall clock, whole run);
``text_macs_report`` puts this product's whole-run MAC ratio per mode beside it.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from hash3d_dg.bench.flops import autoencoder_gmacs, count_gmacs, taesd_gmacs, unet_report_fields
from hash3d_dg.cache.config import CACHE_POINTS

#: The paper's text-to-3D claim this is compared with (Hash3D, Yang & Wang: GaussianDreamer).
PAPER_TEXT_CLAIM = {"model": "GaussianDreamer", "speedup": 1.5, "measure": "wall-clock time of a whole run"}
TEXT_IMAGE_SIZE = 512
TOKENS = 77


def meta_sd21_unet():
    from diffusers import UNet2DConditionModel

    from hash3d_dg.guidance.tiny_sd import sd21_unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**sd21_unet_config()).eval()


def meta_sd21_vae():
    from diffusers import AutoencoderKL

    from hash3d_dg.guidance.tiny_sd import sd21_vae_config

    with torch.device("meta"):
        return AutoencoderKL(**sd21_vae_config()).eval()


def _unet_inputs(unet, batch: int, latent: int):
    sample = torch.empty(batch, unet.config.in_channels, latent, latent, device="meta")
    timestep = torch.full((batch,), 500, dtype=torch.long, device="meta")
    context = torch.empty(batch, TOKENS, unet.config.cross_attention_dim, device="meta")
    return sample, timestep, context


@lru_cache(maxsize=4)
def sd21_unet_gmacs(image_size: int = TEXT_IMAGE_SIZE, batch: int = 2) -> dict:
    """Full and shallow (per named cache point) GMACs of the SD 2.1 UNet for a CFG batch."""
    from hash3d_dg.guidance.unet_split import UNetSplit

    unet = meta_sd21_unet()
    sample, timestep, context = _unet_inputs(unet, batch, image_size // 8)
    with torch.no_grad():
        full = count_gmacs(unet, sample, timestep, encoder_hidden_states=context)
        shallow = {}
        for point in CACHE_POINTS:
            split = UNetSplit(unet, point)
            _, feature = split.full(sample, timestep, context)
            shallow[point] = count_gmacs(split.shallow, sample, timestep, context, feature)
    return {"full": full, "shallow_by_point": shallow}


@lru_cache(maxsize=4)
def sd21_vae_gmacs(image_size: int = TEXT_IMAGE_SIZE) -> dict:
    return autoencoder_gmacs(meta_sd21_vae(), image_size)


def taesd_text_gmacs(image_size: int = TEXT_IMAGE_SIZE) -> dict:
    """TAESD at the text path's 512 px (``flops.taesd_gmacs``)."""
    return taesd_gmacs(image_size)


@lru_cache(maxsize=1)
def sd21_text_encoder_gmacs() -> float:
    from transformers import CLIPTextModel

    from hash3d_dg.guidance.tiny_sd import sd21_text_encoder_config

    with torch.device("meta"):
        model = CLIPTextModel(sd21_text_encoder_config()).eval()
    ids = torch.zeros(1, TOKENS, dtype=torch.long, device="meta")
    with torch.no_grad():
        return count_gmacs(model, ids)


def text_flops_report(image_size: int = TEXT_IMAGE_SIZE, cache_point: str = "paper") -> dict:
    """The numbers ``python -m hash3d_dg.bench flops --task text`` prints."""
    vae = sd21_vae_gmacs(image_size)
    return {
        "architecture": "Stable Diffusion 2.1-base (UNet: linear projections, heads [5, 10, 20, 20] x 64, "
                        "cross-attention 1024, 77 tokens) + SD VAE + OpenCLIP ViT-H text tower (23 layers)",
        **unet_report_fields(sd21_unet_gmacs(image_size, 2), image_size, cache_point),
        "vae_encode_gmacs": round(vae["encode"], 3),
        "vae_encode_backward_gmacs": round(vae["encode_backward"], 3),
        "vae_decode_gmacs": round(vae["decode"], 3),
        "tiny_vae_gmacs": {k: round(v, 3) for k, v in taesd_text_gmacs(image_size).items()},
        "text_encoder_gmacs_per_prompt": round(sd21_text_encoder_gmacs(), 3),
        "tiny_vae": "TAESD architecture (diffusers AutoencoderTiny, madebyollin/taesd config; SD 1.x/2.x latents)",
        "counter": "torch.utils.flop_counter.FlopCounterMode on the meta device; GMACs = FLOPs / 2e9",
    }


def text_per_call_gmacs(cache_point="paper", vae: str = "full", image_size: int = TEXT_IMAGE_SIZE) -> dict:
    unet = sd21_unet_gmacs(image_size, 2)
    point = cache_point if isinstance(cache_point, str) else tuple(cache_point)
    if isinstance(point, tuple):
        from hash3d_dg.guidance.unet_split import UNetSplit

        m = meta_sd21_unet()
        sample, timestep, context = _unet_inputs(m, 2, image_size // 8)
        with torch.no_grad():
            split = UNetSplit(m, point)
            _, feature = split.full(sample, timestep, context)
            shallow = count_gmacs(split.shallow, sample, timestep, context, feature)
    else:
        shallow = unet["shallow_by_point"][point]
    parts = taesd_text_gmacs(image_size) if vae == "tiny" else sd21_vae_gmacs(image_size)
    return {"unet_full_cfg_pair": unet["full"], "unet_shallow_cfg_pair": shallow,
            "vae_encode_forward": parts["encode"], "vae_encode_backward": parts["encode_backward"],
            "vae_decode": parts["decode"]}


def text_bench_config(mode: str, iters: int, iters_refine: int, size: int = 32, seed: int = 0,
                      **hash3d_overrides):
    """configs/text.yaml's loop settings with the built-in tiny SD at ``size`` px renders."""
    from hash3d_dg.config import load_config

    overrides = {"seed": seed, "device": "cpu", "guidance.model": "builtin:tiny", "guidance.image_size": 64,
                 "stage1.iters": iters, "stage1.num_pts": 1000, "stage1.render_res": [size, size, size],
                 "stage2.iters": iters_refine, "stage2.render_res": size, "hash3d.mode": mode}
    overrides.update({f"hash3d.{k}": v for k, v in hash3d_overrides.items()})
    return load_config("text.yaml", overrides)


def text_count_calls(mode: str, iters: int, iters_refine: int, seed: int = 0, size: int = 32,
                     prompt: str = "a ceramic mug with a blue glaze", **hash3d_overrides) -> dict:
    """UNet calls (full / shallow) and cache activity of the real stage loops in text mode."""
    from hash3d_dg.bench.harness import run_stages, standin_mesh
    from hash3d_dg.guidance.sd import build_sd_guidance
    from hash3d_dg.stages import ReferenceView

    cfg = text_bench_config(mode, iters, iters_refine, size, seed, **hash3d_overrides)
    guidance = build_sd_guidance(cfg, torch.device("cpu"), torch.float32)
    guidance.set_reference(None, cfg.elevation)
    guidance.set_prompt(prompt, cfg.guidance.negative_prompt)
    ref = ReferenceView.camera_only(cfg.elevation, cfg.radius, cfg.fovy, size, "cpu")
    result = run_stages(cfg, guidance, ref, standin_mesh())
    s1, s2 = result["stage1"], result["stage2"]
    return {
        "stage1": {"sds_calls": iters * cfg.stage1.batch_size,
                   "unet_full_calls": s1["unet"]["full_calls"], "unet_shallow_calls": s1["unet"]["shallow_calls"],
                   "cache_hits": s1["cache"]["hits"], "cache_attempts": s1["cache"]["attempts"]},
        "stage2": {"refine_calls": iters_refine,
                   "unet_full_calls": s2["unet"]["full_calls"], "unet_shallow_calls": s2["unet"]["shallow_calls"],
                   "cache_hits": s2["cache"]["hits"], "cache_attempts": s2["cache"]["attempts"]},
    }


def text_macs_report(iters: int = 500, iters_refine: int = 50, seed: int = 0, cache_point=None,
                     modes=("off", "paper", "official", "fast"), vae: str = "auto") -> dict:
    """Whole-run TMACs of a text run per mode (``macs.macs_report``'s arithmetic, SD 2.1's
    GMACs, the text loops' call counts), with the paper's text-to-3D claim beside them."""
    from hash3d_dg.bench.harness import describe_machine
    from hash3d_dg.bench.macs import mode_settings, run_tmacs

    out = {"task": "text", "modes": {}, "iters": iters, "iters_refine": iters_refine,
           "image_size": TEXT_IMAGE_SIZE, "cache_point_override": cache_point, "vae": vae,
           "text_encoder_gmacs_per_prompt": round(sd21_text_encoder_gmacs(), 3),
           "paper_claim": PAPER_TEXT_CLAIM,
           "not_counted": "rasterizers (Gaussian splatting, mesh), the stage-2 render backward and the "
                          "text encoder (once per prompt)",
           "machine": describe_machine()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the loops' many small CPU ops: one thread (a shared 2-core machine stalls on more)
    try:
        counted = {}
        for mode in modes:
            point, _ = mode_settings(mode, cache_point, vae)
            counted[mode] = text_count_calls(mode, iters, iters_refine, seed,
                                             **({"cache_point": point} if mode != "off" else {}))
    finally:
        torch.set_num_threads(threads)
    for mode in modes:
        point, vae_kind = mode_settings(mode, cache_point, vae)
        per_call = text_per_call_gmacs(point, vae_kind)
        calls = counted[mode]
        entry = run_tmacs(per_call, calls)
        entry.update(cache_point=point if mode != "off" else None, vae=vae_kind,
                     gmacs_per_call={k: round(v, 3) for k, v in per_call.items()}, calls=calls)
        out["modes"][mode] = entry
    off = out["modes"].get("off")
    for entry in out["modes"].values():
        if off:
            entry["ratio_to_off"] = round(entry["total_tmacs"] / off["total_tmacs"], 4)
            entry["speedup_vs_off"] = round(off["total_tmacs"] / entry["total_tmacs"], 3)
            entry["unet_ratio_to_off"] = round(entry["unet_tmacs"] / off["unet_tmacs"], 4)
    return out


def run_flops_from_args(args) -> dict:
    """``bench flops --task text``."""
    return text_flops_report(args.image_size or TEXT_IMAGE_SIZE, args.cache_point)


def run_macs_from_args(args) -> dict:
    """``bench macs --task text``."""
    return text_macs_report(args.iters, args.iters_refine, args.seed, args.cache_point,
                            tuple(args.modes), args.vae)
