"""How wrong a reused deep feature makes the UNet's prediction, per cache point.

``python -m hash3d_dg.bench staleness --json``

The oracle benchmark cannot tell cache points apart: its deep feature is defined as the clean
render of the conditioning camera, whatever the split. This benchmark measures the other half on
the real stable-zero123 UNet architecture (random weights: nothing can be downloaded here): the
feature is computed for one query (the *source*) and reused for a nearby one (the *target*),
exactly as a cache hit does, and the shallow prediction is compared with the target's own full
forward.

Queries follow SDS: ``x_t = sqrt(ab_t) z + sqrt(1 - ab_t) eps`` with fresh noise ``eps`` at every
call (the cache's stored input never equals the next query). Scenarios:

- ``timestep``: same clean latent, timestep ``t`` vs ``t + dt`` (the annealed schedule drifts ~2
  steps an iteration; a 20-step cell spans up to 20);
- ``camera``: a clean latent ``z'`` that differs from ``z`` by ``rel`` of its norm (a neighbouring
  view), same timestep.

For each, ``shallow_err = ||shallow(x_tgt, f(x_src)) - full(x_tgt)|| / ||full(x_tgt)||`` and, as the
scale to read it against, ``stale_err``: the same for reusing the whole output
(``full(x_src)`` for ``x_tgt``). A deeper cache point (more of the net recomputed from the current
input) should give a smaller ``shallow_err``. Random weights are not trained ones: the figures
show how much of the output the architecture's skip path carries, not the trained model's drift.
"""

from __future__ import annotations

import argparse
import time

import torch

from hash3d_dg.guidance.unet_split import UNetSplit

#: The named cache points: the last pair only, DeepCache's (0, 0) = the paper's, the whole last block.
POINTS = ("last_subblock", "paper", "last_block")


def _unet(size: str, seed: int):
    from diffusers import UNet2DConditionModel

    from hash3d_dg.guidance.tiny import stable_zero123_unet_config, tiny_unet_config

    torch.manual_seed(seed)
    cfg = stable_zero123_unet_config() if size == "full" else tiny_unet_config()
    return UNet2DConditionModel.from_config(cfg).eval().requires_grad_(False)


def _alpha_bar(t: int) -> float:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    return float(torch.cumprod(1 - betas, 0)[t])


def staleness_report(size: str = "full", seed: int = 0, timesteps=(700, 300), dts=(2, 10, 20),
                     rels=(0.05, 0.2), latent: int = 32) -> dict:
    unet = _unet(size, seed)
    splits = {name: UNetSplit(unet, name) for name in POINTS}
    g = torch.Generator().manual_seed(seed + 1)
    ch = unet.config.in_channels // 2
    z = torch.randn(1, ch, latent, latent, generator=g)
    cond_lat = torch.randn(1, ch, latent, latent, generator=g)
    context = torch.randn(1, 1, unet.config.cross_attention_dim, generator=g)

    def noisy(clean, t):
        ab = _alpha_bar(t)
        x = ab**0.5 * clean + (1 - ab) ** 0.5 * torch.randn(clean.shape, generator=g)
        return torch.cat([x, cond_lat], dim=1)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    rows, start = [], time.perf_counter()
    ref_split = splits["paper"]
    with torch.no_grad():
        for t in timesteps:
            cases = [("timestep", f"dt={dt}", z, t + dt) for dt in dts]
            for r in rels:
                d = torch.randn(z.shape, generator=g)
                cases.append(("camera", f"rel={r}", z + r * d * (z.norm() / d.norm()), t))
            for scenario, setting, src_clean, src_t in cases:
                x_tgt, x_src = noisy(z, t), noisy(src_clean, src_t)
                t_tgt, t_src = torch.tensor([t]), torch.tensor([src_t])
                out_tgt, _ = ref_split.full(x_tgt, t_tgt, context)
                out_src, _ = ref_split.full(x_src, t_src, context)
                row = {"scenario": scenario, "setting": setting, "t": t,
                       "stale_err": round(rel(out_src, out_tgt), 4)}
                for name, split in splits.items():
                    _, feat = split.full(x_src, t_src, context)
                    row[f"shallow_err_{name}"] = round(rel(split.shallow(x_tgt, t_tgt, context, feat), out_tgt), 4)
                rows.append(row)
    means = {name: round(sum(r[f"shallow_err_{name}"] for r in rows) / len(rows), 4) for name in POINTS}
    return {"unet": size, "latent": latent, "seed": seed, "points": list(POINTS),
            "rows": rows, "mean_shallow_err": means,
            "mean_stale_err": round(sum(r["stale_err"] for r in rows) / len(rows), 4),
            "seconds": round(time.perf_counter() - start, 1),
            "note": "random weights (architecture only): how much of the prediction the recomputed "
                    "shallow path restores from the current input; not the trained model's drift"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unet", choices=["full", "tiny", "learned"], default="full",
                   help="full: the stable-zero123 architecture (default); tiny: the test model; "
                        "learned: the trained learned oracle against its random init "
                        "(hash3d_dg/eval/learned_oracle.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent", type=int, default=32, help="latent size (32 = 256 px images)")


def run_from_args(args) -> dict:
    if args.unet == "learned":
        from hash3d_dg.eval.learned_oracle import staleness_report as learned_staleness

        return learned_staleness(seed=args.seed)
    return staleness_report(size=args.unet, seed=args.seed, latent=args.latent)
