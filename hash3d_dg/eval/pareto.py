"""More shallow calls at equal quality: UNet calls served from the table against oracle quality.

``python -m hash3d_dg.bench pareto --json [--size tiny] [--plot PNG]`` runs the oracle harness
(``oracle.run_oracle_once``: the real stage loops, an oracle denoiser behind the real cache) once
per cache policy setting and reports, for each, the share of UNet calls served shallow (stage 1,
stage 2, whole run) next to the final mesh's PSNR / SSIM / IoU, plus the Pareto front (no other
setting serves more stage-1 calls at a higher PSNR).

Settings swept (all with the same seed, so the same views and noise):

- ``eta``: the paper preset with retrieval probability eta;
- ``eta+fallback``: eta with the timestep fall-back policy (``timestep_fallback`` cells);
- ``gate``: the camera gate (``camera_gate_deg``) on top of the fall-back;
- ``grid``: one fixed 30-degree grid (non-adaptive) with the fall-back;
- ``off`` at other seeds: the seed-to-seed spread, the noise floor of every PSNR difference.

A reduced sweep (``SWEEP``, ordered by how much each run tells): the whole grid of eta x cells x
gates x cache points at the default iteration counts does not fit a 2-core machine.

Stage 2 uses ``trajectory`` reuse in every cached setting (the fast preset's choice) so that the
settings differ in stage 1 only. What the oracle can and cannot tell: its deep feature is the
clean render of the conditioning camera, independent of the timestep and of the noisy input, so
reuse across timesteps (the fall-back policy) and along one refine trajectory costs nothing here,
and the cache point does not exist for it (every point gives identical runs). Only reuse across
cameras costs quality, as a stale camera would in a real UNet. A real UNet's features also drift
with the timestep; that part cannot be measured without weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from hash3d_dg.eval.oracle import _run_job, grid_for, resolve_settings
from hash3d_dg.cache import Hash3DConfig

NOISE_SEEDS = (1, 2)


def _policy(eta: float, fallback: int = 0, gate: float | None = None, grid: float | None = None) -> Hash3DConfig:
    extra = {} if grid is None else {"grids": [grid_for(grid)], "adaptive": False}
    return Hash3DConfig.preset("paper", eta=eta, timestep_fallback=fallback, camera_gate_deg=gate,
                               stage2="trajectory", **extra)


def _label(eta: float, fallback: int = 0, gate: float | None = None, grid: float | None = None) -> str:
    parts = [f"eta {eta:g}"]
    if fallback:
        parts.append(f"fallback {fallback}")
    if gate is not None:
        parts.append(f"gate {gate:g}")
    if grid is not None:
        parts.append(f"grid {grid:g}")
    return " + ".join(parts)


#: The swept settings, most informative first (``(group, eta, fallback, gate, grid)``).
SWEEP: tuple[tuple[str, float, int, float | None, float | None], ...] = (
    ("gate", 0.7, 3, 15.0, None),
    ("eta+fallback", 0.5, 3, None, None),
    ("gate", 1.0, 3, 15.0, None),
    ("gate", 0.5, 3, 15.0, None),
    ("eta", 0.5, 0, None, None),
    ("eta", 1.0, 0, None, None),
    ("gate", 1.0, 10, 10.0, None),
    ("eta", 0.1, 0, None, None),
    ("eta+fallback", 1.0, 3, None, None),
    ("grid", 0.5, 3, None, 30.0),
)


def sweep_settings(sweep: str = "default", policies: int | None = None) -> list[tuple[str, dict, Hash3DConfig, int]]:
    """``(label, {group, ...}, Hash3DConfig, seed offset)`` of every run of the sweep: ``off``,
    the ``SWEEP`` settings, then ``off`` at the ``NOISE_SEEDS`` offsets (the seed-to-seed spread).
    ``sweep="learned"``: the presets and the policies of ``learned_oracle.LEARNED_SWEEP`` instead
    (cache point, stage-2 reuse, blending) for the learned judge."""
    rows: list[tuple[str, dict, Hash3DConfig, int]] = [("off", {"group": "off"}, Hash3DConfig.preset("off"), 0)]
    if sweep == "learned":
        from hash3d_dg.eval.learned_oracle import learned_sweep

        rows.extend(learned_sweep(policies))
        for s in NOISE_SEEDS[:1]:
            rows.append((f"off seed +{s}", {"group": "off-seed"}, Hash3DConfig.preset("off"), s))
        return rows
    for group, eta, fallback, gate, grid in SWEEP:
        meta = {"group": group, "eta": eta, "fallback": fallback, "gate": gate, "grid": grid}
        rows.append((_label(eta, fallback, gate, grid), meta, _policy(eta, fallback, gate, grid), 0))
    for s in NOISE_SEEDS:
        rows.append((f"off seed +{s}", {"group": "off-seed"}, Hash3DConfig.preset("off"), s))
    return rows


def pareto_front(rows: list[dict], x: str = "stage1_shallow_fraction", y: str = "psnr") -> list[str]:
    """Labels of the rows no other row beats on both ``x`` and ``y`` (ties kept)."""
    front = []
    for r in rows:
        dominated = any((o[x] >= r[x] and o[y] >= r[y]) and (o[x] > r[x] or o[y] > r[y]) for o in rows)
        if not dominated:
            front.append(r["label"])
    return front


#: What each judge's deep feature is (what the cache's approximations can cost on it).
JUDGE_NOTES = {
    "analytic": ("Oracle deep feature = clean render of the conditioning camera: timestep "
                 "fall-back and trajectory reuse cost nothing here; the cache point does not "
                 "exist for the oracle."),
    "learned": ("Judge: the learned oracle (eval/learned.py), a trained 32 px denoiser whose deep "
                "feature is its UNet's at each run's cache point (UNetSplit): it depends on the "
                "timestep and carries the noise of the pass that computed it."),
    "random": "Judge: the learned oracle's architecture at its random init (a control).",
}


def _row(label: str, meta: dict, result: dict) -> dict:
    u1, u2 = result["stage1"]["unet"], result["stage2"]["unet"]
    calls1 = u1["full_calls"] + u1["shallow_calls"]
    calls2 = u2["full_calls"] + u2["shallow_calls"]
    total = calls1 + calls2
    return {"label": label, **meta,
            "psnr": result["psnr"], "ssim": result["ssim"], "mask_iou": result["mask_iou"],
            "stage1_psnr": result["stage1_psnr"],
            "stage1_shallow_calls": u1["shallow_calls"], "stage1_calls": calls1,
            "stage1_shallow_fraction": round(u1["shallow_calls"] / max(calls1, 1), 4),
            "stage2_shallow_fraction": round(u2["shallow_calls"] / max(calls2, 1), 4),
            "shallow_fraction": round((u1["shallow_calls"] + u2["shallow_calls"]) / max(total, 1), 4),
            "stage1_cache": {"hits": result["stage1"]["cache_hits"], "attempts": result["stage1"]["cache_attempts"]},
            "seconds": result["seconds"]}


def pareto_report(size: str = "tiny", iters: int = 500, iters_refine: int = 50, seed: int = 0,
                  jobs: int = 1, plot: str | None = None, partial: str | None = None,
                  judge: str = "analytic", sweep: str = "default", policies: int | None = None) -> dict:
    """Run the sweep; see the module docstring. ``plot``: write the Pareto chart there (PNG);
    ``partial``: append each finished run there as one JSON line (long sweeps on a busy machine)."""
    import json
    import logging

    log = logging.getLogger(__name__)
    settings = resolve_settings(size, judge=judge)
    runs = sweep_settings(sweep, policies)
    work = [(h, settings, iters, iters_refine, seed + offset) for _, _, h, offset in runs]
    start = time.perf_counter()
    results: list[dict | None] = [None] * len(work)

    def done(i: int, result: dict) -> None:
        results[i] = result
        label, meta = runs[i][0], runs[i][1]
        log.info("pareto %d/%d %s: psnr %.3f, stage-1 shallow %d", sum(r is not None for r in results),
                 len(work), label, result["psnr"], result["stage1"]["unet"]["shallow_calls"])
        if partial:
            with open(partial, "a") as fh:
                fh.write(json.dumps(_row(label, meta, result)) + "\n")

    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_job, w): i for i, w in enumerate(work)}
            for future in as_completed(futures):
                done(futures[future], future.result())
    else:
        for i, w in enumerate(work):
            done(i, _run_job(w))
    all_rows = [_row(label, meta, r) for (label, meta, _, _), r in zip(runs, results)]
    rows = [r for r in all_rows if r["group"] != "off-seed"]
    off_psnrs = [r["psnr"] for r in all_rows if r["group"] in ("off", "off-seed")]
    report = {
        "rows": rows,
        "pareto_front": pareto_front(rows),
        "pareto_front_stage1_psnr": pareto_front(rows, y="stage1_psnr"),
        "off_psnr_by_seed": {str(seed + offset): r["psnr"] for (_, meta, _, offset), r in zip(runs, all_rows)
                             if meta["group"] in ("off", "off-seed")},
        "off_psnr_spread": round(max(off_psnrs) - min(off_psnrs), 3),
        "settings": {"size": size, "iters": iters, "iters_refine": iters_refine, "seed": seed,
                     **settings, "total_seconds": round(time.perf_counter() - start, 1),
                     "stage2": "trajectory reuse in every cached setting",
                     "configs": {label: dataclasses.asdict(h) for label, _, h, _ in runs},
                     "notes": ("reduced setting: the oracle at --size " + size + " with the default "
                               "iteration counts (so call counts and hit rates are those of a "
                               "default run; PSNR is that of a small render). " + JUDGE_NOTES.get(
                                   judge, "judge: " + judge))},
    }
    if plot:
        plot_pareto(report, plot)
        report["plot"] = plot
    return report


def plot_pareto(report: dict, path: str) -> None:
    """Stage-1 shallow fraction against the final mesh's PSNR (left) and the stage-1 Gaussians'
    PSNR (right), one marker per group, each panel's Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), dpi=110)
    markers = {"off": "*", "eta": "o", "eta+fallback": "s", "gate": "^", "grid": "v",
               "preset": "P", "policy": "D"}
    s = report["settings"]
    for ax, metric, title in ((axes[0], "psnr", "final mesh PSNR vs ground truth (dB)"),
                              (axes[1], "stage1_psnr", "stage-1 Gaussians PSNR vs ground truth (dB)")):
        for group, marker in markers.items():
            sel = [r for r in rows if r["group"] == group]
            if sel:
                ax.scatter([r["stage1_shallow_fraction"] for r in sel], [r[metric] for r in sel],
                           marker=marker, s=60, label=group)
        labels = pareto_front(rows, y=metric)
        front = sorted((r for r in rows if r["label"] in labels), key=lambda r: r["stage1_shallow_fraction"])
        ax.plot([r["stage1_shallow_fraction"] for r in front], [r[metric] for r in front], "k--", lw=1,
                label="Pareto front")
        for r in rows:
            ax.annotate(r["label"], (r["stage1_shallow_fraction"], r[metric]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        if metric == "psnr":
            spread = report["off_psnr_spread"]
            off = rows[0]["psnr"]
            ax.axhspan(off - spread, off + spread, color="grey", alpha=0.15,
                       label=f"off +- seed spread ({spread} dB)")
        ax.set_xlabel("stage-1 UNet calls served shallow (fraction)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Hash3D policies on the {s.get('judge', 'analytic')} oracle (--size {s['size']}, {s['iters']}+{s['iters_refine']} iters, "
                 "reduced setting)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="tiny", help="oracle size preset (default tiny)")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--iters-refine", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--partial", default=None, help="append each finished run here as a JSON line")
    p.add_argument("--plot", default=None, help="write the Pareto chart (PNG) here")
    p.add_argument("--judge", default="analytic", choices=["analytic", "learned", "random"],
                   help="the oracle's denoiser (see bench oracle --judge)")
    p.add_argument("--sweep", default="default", choices=["default", "learned"],
                   help="default: the eta / fall-back / gate / grid sweep; learned: the presets and "
                        "the cache-point / stage-2 / blending policies (learned_oracle.LEARNED_SWEEP)")
    p.add_argument("--policies", type=int, default=None,
                   help="with --sweep learned: run only the first N policies (default all)")


def run_from_args(args) -> dict:
    torch.set_num_threads(1)
    return pareto_report(args.size, args.iters, args.iters_refine, args.seed, args.jobs,
                         args.plot, args.partial, judge=args.judge, sweep=args.sweep,
                         policies=args.policies)
