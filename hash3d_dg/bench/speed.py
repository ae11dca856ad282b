"""Seconds per stage-1 and stage-2 iteration, hash3d off vs each mode, side by side in one
process with the same seed. Weights are random (timing only). On CPU the UNet is a small one
and the VAE the tiny one; on CUDA the full-size stable-zero123 UNet and VAE in fp16 with the
CUDA rasterizers where installed."""

from __future__ import annotations

import argparse
import time

import torch

from hash3d_dg.bench.harness import (bench_config, describe_machine, run_stages, sample_reference,
                                     sized_guidance, standin_mesh)
from hash3d_dg.guidance.unet_split import UNetSplit

MODES = ("off", "paper", "official", "fast")


class _Timed:
    """Wraps a guidance method to add up the seconds spent in it (forward only: the SDS loss's
    backward through the VAE runs later, inside the stage's loss.backward())."""

    def __init__(self, fn, synchronize: bool) -> None:
        self.fn, self.synchronize = fn, synchronize
        self.seconds, self.calls = 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.synchronize:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    @property
    def per_call(self) -> float:
        return self.seconds / self.calls if self.calls else 0.0


def unet_call_seconds(guidance, repeats: int = 10) -> dict:
    """Median seconds of one full and one shallow UNet call (a CFG pair), interleaved in one loop
    so both see the same machine load."""
    unet = guidance.components.unet
    split = UNetSplit(unet, guidance.hash3d.cache_point if guidance.hash3d is not None else "paper")
    latent = guidance.image_size // 8
    device, dtype = torch.device(guidance.device), unet.dtype
    sample = torch.randn(2, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    timestep = torch.tensor([500, 500], device=device)
    context = torch.randn(2, 1, unet.config.cross_attention_dim, device=device, dtype=dtype)
    full_times, shallow_times = [], []
    with torch.no_grad():
        _, feature = split.full(sample, timestep, context)  # warm-up and the feature to reuse
        split.shallow(sample, timestep, context, feature)
        for _ in range(repeats):
            for fn, times in ((lambda: split.full(sample, timestep, context), full_times),
                              (lambda: split.shallow(sample, timestep, context, feature), shallow_times)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    full, shallow = sorted(full_times)[repeats // 2], sorted(shallow_times)[repeats // 2]
    return {"unet_full_s": round(full, 6), "unet_shallow_s": round(shallow, 6),
            "shallow_to_full": round(shallow / full, 4), "cache_point": list(split.cache_point)}


def speed_report(iters: int = 40, iters_refine: int = 8, size: int = 128, unet: str | None = None,
                 vae: str | None = None, device: str = "auto", seed: int = 0, repeats: int = 2,
                 modes=MODES) -> dict:
    device_t = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                            ("cpu" if device == "auto" else device))
    on_cuda = device_t.type == "cuda"
    unet = unet or ("full" if on_cuda else "small")
    vae = vae or ("full" if on_cuda else "tiny")
    dtype = torch.float16 if on_cuda else torch.float32
    image_size = 256 if vae == "full" else 128
    from hash3d_dg.pipeline import RunContext

    contexts = {}
    for mode in modes:
        cfg = bench_config(mode, iters, iters_refine, size=size, image_size=image_size, seed=seed,
                           device=str(device_t))
        contexts[mode] = RunContext.create(cfg, progress=False)
    # Repeat-major: every repeat runs each mode once, so a change in machine load hits all modes;
    # each mode keeps its fastest repeat.
    timings: dict[str, list[dict]] = {mode: [] for mode in modes}
    unet_calls = None
    for _ in range(repeats):
        for mode in modes:
            cfg = contexts[mode].cfg
            guidance = sized_guidance(cfg, device_t, dtype, unet, vae)
            if unet_calls is None:
                unet_calls = unet_call_seconds(guidance)
            ref = sample_reference(cfg.stage1.ref_size, cfg, device_t)
            guidance.set_reference(ref.image_nchw(), cfg.elevation)
            mesh = standin_mesh(device=device_t)
            sds_timer = _Timed(guidance.sds, on_cuda)
            refine_timer = _Timed(guidance.refine, on_cuda)
            guidance.sds, guidance.refine = sds_timer, refine_timer
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            reports = run_stages(cfg, guidance, ref, mesh)
            if on_cuda:
                torch.cuda.synchronize()
            reports["wall"] = time.perf_counter() - start
            reports["sds_s_per_call"] = sds_timer.per_call
            reports["refine_s_per_call"] = refine_timer.per_call
            timings[mode].append(reports)

    results = {}
    for mode in modes:
        s1 = min((r["stage1"] for r in timings[mode]), key=lambda r: r["seconds"])
        s2 = min((r["stage2"] for r in timings[mode]), key=lambda r: r["seconds"])
        results[mode] = {
            "stage1_s_per_iter": round(s1["seconds"] / max(iters, 1), 5),
            "stage2_s_per_iter": round(s2["seconds"] / max(iters_refine, 1), 5),
            "sds_forward_s_per_call": round(min(r["sds_s_per_call"] for r in timings[mode]), 5),
            "refine_s_per_call": round(min(r["refine_s_per_call"] for r in timings[mode]), 5),
            "stage1_unet": s1["unet"], "stage2_unet": s2["unet"],
            "stage1_hits": s1["cache"]["hits"], "stage2_hits": s2["cache"]["hits"],
            "backends": {"gaussian": contexts[mode].gaussian_backend, "mesh": contexts[mode].mesh_backend},
        }
    off = results.get("off")
    if off:
        for entry in results.values():
            entry["stage1_ratio_to_off"] = round(entry["stage1_s_per_iter"] / off["stage1_s_per_iter"], 4)
            entry["stage2_ratio_to_off"] = round(entry["stage2_s_per_iter"] / off["stage2_s_per_iter"], 4)
            entry["sds_ratio_to_off"] = round(entry["sds_forward_s_per_call"] / off["sds_forward_s_per_call"], 4)
            entry["refine_ratio_to_off"] = round(entry["refine_s_per_call"] / off["refine_s_per_call"], 4)
    return {"modes": results, "unet_call": unet_calls, "settings": {"iters": iters, "iters_refine": iters_refine,
                                           "render_size": size, "unet": unet, "vae": vae,
                                           "dtype": str(dtype).replace("torch.", ""),
                                           "guidance_image_size": image_size, "repeats": repeats,
                                           "device": str(device_t)},
            "machine": describe_machine()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=40, help="stage-1 iterations per mode")
    p.add_argument("--iters-refine", type=int, default=8, help="stage-2 iterations per mode")
    p.add_argument("--size", type=int, default=128, help="render size")
    p.add_argument("--unet", choices=["tiny", "small", "full"], help="default: full on CUDA, small on CPU")
    p.add_argument("--vae", choices=["tiny", "full"], help="default: full on CUDA, tiny on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="each mode runs this often, interleaved; the fastest counts")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))


def run_from_args(args) -> dict:
    return speed_report(args.iters, args.iters_refine, args.size, args.unet, args.vae, args.device,
                        args.seed, args.repeats, tuple(args.modes))
