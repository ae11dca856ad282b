"""Where a whole run's cost goes, per phase and per Hash3D mode.

``python -m hash3d_dg.bench breakdown --json [--plot PNG]`` reports two things side by side:

* MACs of a default run (500 + 50 iterations, default render sizes) per phase and mode: GMACs per
  call from the real stable-zero123 architecture (and TAESD for the tiny autoencoder) on the
  meta device times the call counts of the real stage loops (``macs.macs_report``). Only network
  work is counted; rasterisation, the optimiser, densification, meshing and export are not
  matrix work and appear as 0 MACs (their cost is in the seconds column).
* CPU seconds of a small real run per phase: the real ``prepare_image`` -> ``run_stage1`` ->
  ``extract_textured_mesh`` -> ``run_stage2`` -> export and previews, on the built-in tiny model at
  small sizes, each phase profiled with ``cProfile`` and split by the functions that do the work
  (cumulative time of e.g. ``encode_images``, ``UNetSplit.full``, ``Tensor.backward``, the Adam
  step). The VAE encoder's backward is timed with autograd hooks on its input and output; the
  render backward is the rest of ``Tensor.backward``. ``other`` is what no listed function
  covers (loop bookkeeping, the reference-view loss, logging); marching cubes (compiled, invisible
  to cProfile) is ``extract_mesh`` minus its density grid, clean-up and decimation. The modes'
  small runs are timed one after the other, so on a shared machine compare parts within a mode
  more than totals across modes. With tiny networks these seconds
  show the non-network work at its real size and the network work far below its real size: read
  them with the MACs column.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch

#: (phase, part) rows of the report, in run order.
PARTS: tuple[tuple[str, str], ...] = (
    ("preprocess", "preprocess"),
    ("stage1", "render_forward"), ("stage1", "render_backward"),
    ("stage1", "vae_encode_forward"), ("stage1", "vae_encode_backward"),
    ("stage1", "unet_full"), ("stage1", "unet_shallow"),
    ("stage1", "optimizer"), ("stage1", "densification"), ("stage1", "other"),
    ("mesh", "density_grid"), ("mesh", "marching_cubes"), ("mesh", "cleanup"),
    ("mesh", "decimation"), ("mesh", "uv"), ("mesh", "bake"), ("mesh", "other"),
    ("stage2", "render"), ("stage2", "encode"), ("stage2", "refine_unet"), ("stage2", "decode"),
    ("stage2", "loss_backward_optimizer"), ("stage2", "other"),
    ("export", "export"), ("export", "previews"),
)


# ---------------------------------------------------------------------------------- MACs

def macs_by_part(mode_entry: dict) -> dict[str, float]:
    """TMACs per ``phase.part`` of one mode of ``macs.macs_report``."""
    g = mode_entry["gmacs_per_call"]
    c1, c2 = mode_entry["calls"]["stage1"], mode_entry["calls"]["stage2"]
    out = {f"{p}.{q}": 0.0 for p, q in PARTS}
    out["stage1.vae_encode_forward"] = c1["sds_calls"] * g["vae_encode_forward"]
    out["stage1.vae_encode_backward"] = c1["sds_calls"] * g["vae_encode_backward"]
    out["stage1.unet_full"] = c1["unet_full_calls"] * g["unet_full_cfg_pair"]
    out["stage1.unet_shallow"] = c1["unet_shallow_calls"] * g["unet_shallow_cfg_pair"]
    out["stage2.encode"] = c2["refine_calls"] * g["vae_encode_forward"]
    out["stage2.refine_unet"] = (c2["unet_full_calls"] * g["unet_full_cfg_pair"]
                                 + c2["unet_shallow_calls"] * g["unet_shallow_cfg_pair"])
    out["stage2.decode"] = c2["refine_calls"] * g["vae_decode"]
    return {k: round(v / 1e3, 3) for k, v in out.items()}


# ---------------------------------------------------------------------------------- seconds

def _cumulative(stats: pstats.Stats, name: str, path_part: str = "", caller: str | None = None) -> float | None:
    """Cumulative seconds of functions called ``name`` whose file contains ``path_part``
    (optionally only the calls made from a function called ``caller``); None when never called."""
    total, seen = 0.0, False
    for (filename, _, funcname), (_, _, _, ct, callers) in stats.stats.items():
        builtin = filename == "~" and funcname.startswith("<") and funcname.rstrip(">").endswith("." + name)
        if not builtin and (funcname != name or path_part not in filename):
            continue
        seen = True
        if caller is None:
            total += ct
        else:
            total += sum(v[3] for (f, _, fn), v in callers.items() if fn == caller)
    return total if seen else None


def _profile(fn, *args, **kwargs):
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    try:
        result = fn(*args, **kwargs)
    finally:
        prof.disable()
    return result, pstats.Stats(prof), time.perf_counter() - start


class _EncoderBackwardTimer:
    """Times the VAE encoder's backward in ``guidance.encode_images`` (autograd hooks on its
    output latents and its input pixels)."""

    def __init__(self, guidance):
        self.seconds = 0.0
        self._original = guidance.encode_images
        guidance.encode_images = self._encode

    def _encode(self, images):
        if not images.requires_grad:
            return self._original(images)
        images = images.view_as(images)
        started: list[float] = []

        def on_latent_grad(grad):
            started.append(time.perf_counter())
            return grad

        def on_image_grad(grad):
            if started:
                self.seconds += time.perf_counter() - started.pop()
            return grad

        images.register_hook(on_image_grad)
        latents = self._original(images)
        latents.register_hook(on_latent_grad)
        return latents


def _seconds_of(stats: pstats.Stats, rules: dict[str, tuple], total: float) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for part, rule in rules.items():
        values = [_cumulative(stats, *r) for r in rule]
        present = [v for v in values if v is not None]
        out[part] = sum(present) if present else None
    covered = sum(v for v in out.values() if v is not None)
    out["other"] = max(0.0, total - covered)
    return out


def cpu_seconds(mode: str, iters: int = 60, iters_refine: int = 5, size: int = 64, seed: int = 0) -> dict:
    """CPU seconds per ``phase.part`` of a small real run (see the module docstring)."""
    import tempfile

    import numpy as np

    from hash3d_dg.config import TINY_MODEL, build_config
    from hash3d_dg.mesh import export_glb, export_obj
    from hash3d_dg.pipeline import RunContext
    from hash3d_dg.preprocess import prepare_image
    from hash3d_dg.output.previews import PREVIEW_ELEVATION, contact_sheet, render_views, write_turntable
    from hash3d_dg.eval.samples import render_sample
    from hash3d_dg.stages import ReferenceView, extract_textured_mesh, run_stage1, run_stage2

    cfg = build_config({
        "seed": seed, "device": "cpu",
        "guidance": {"model": TINY_MODEL, "image_size": size},
        "stage1": {"iters": iters, "ref_size": size, "num_pts": 1000, "render_res": [size, size, size],
                   "density_start_iter": 10, "densification_interval": 10},
        "mesh": {"resolution": 48, "texture_size": 128, "bake_render_size": size},
        "stage2": {"iters": iters_refine, "render_res": size},
        "output": {"turntable_frames": 8, "preview_size": size, "contact_sheet_views": 4},
        "hash3d": {"mode": mode},
    })
    ctx = RunContext.create(cfg, progress=False)
    cfg = ctx.cfg
    guidance = ctx.guidance()
    enc_timer = _EncoderBackwardTimer(guidance)
    out: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from PIL import Image

        rgba = np.asarray(render_sample("ball", 256), dtype=np.float64)
        Image.fromarray((np.clip(rgba, 0, 1) * 255).round().astype(np.uint8), "RGBA").save(tmp / "ball.png")
        prepared, stats, t = _profile(prepare_image, tmp / "ball.png", size=size, matting="auto")
        out["preprocess.preprocess"] = t
        ref = ReferenceView.from_rgba(prepared.rgba, cfg.elevation, cfg.radius, cfg.fovy, size, ctx.device)
        guidance.set_reference(ref.image_nchw(), cfg.elevation)

        s1, stats, t = _profile(run_stage1, ref, cfg, guidance, progress=False)
        backward = _cumulative(stats, "backward", "torch/_tensor.py") or 0.0
        parts = _seconds_of(stats, {
            "render_forward": (("render", "gaussians"),),
            "vae_encode_forward": (("encode_images", "guidance/zero123"),),
            "unet_full": (("full", "guidance/unet_split"),),
            "unet_shallow": (("shallow", "guidance/unet_split"),),
            "optimizer": (("step", "torch/optim/adam"),),
            "densification": (("step_post_backward", "gaussians"), ("prune", "gaussians", "run_stage1")),
            "backward": (("backward", "torch/_tensor.py"),),
        }, t)
        parts.pop("backward")
        parts["vae_encode_backward"] = enc_timer.seconds
        parts["render_backward"] = max(0.0, backward - enc_timer.seconds)
        out.update({f"stage1.{k}": v for k, v in parts.items()})

        (mesh, _), stats, t = _profile(extract_textured_mesh, s1.gaussians, cfg)
        parts = _seconds_of(stats, {
            "density_grid": (("sample_density_grid", "mesh"),),
            "cleanup": (("_largest_component", "mesh"),),
            "decimation": (("_decimate", "mesh"),),
            "uv": (("unwrap_uv", "mesh"),),
            "bake": (("bake_texture", "mesh"),),
        }, t)
        # PyMCubes is compiled (invisible to cProfile): marching cubes is what extract_mesh spends
        # beyond its density grid, clean-up and decimation.
        extract = _cumulative(stats, "extract_mesh", "mesh")
        if extract is not None:
            known = sum(parts[k] or 0.0 for k in ("density_grid", "cleanup", "decimation"))
            parts["marching_cubes"] = max(0.0, extract - known)
            parts["other"] = max(0.0, parts["other"] - parts["marching_cubes"])
        out.update({f"mesh.{k}": v for k, v in parts.items()})

        guidance.clear_cache()
        s2, stats, t = _profile(run_stage2, mesh, ref, cfg, guidance, progress=False)
        out.update({f"stage2.{k}": v for k, v in _seconds_of(stats, {
            "render": (("render_supersampled", "stages"),),
            "encode": (("encode_images", "guidance/zero123"),),
            "refine_unet": (("full", "guidance/unet_split"), ("shallow", "guidance/unet_split")),
            "decode": (("decode_latents", "guidance"),),
            "loss_backward_optimizer": (("backward", "torch/_tensor.py"), ("step", "torch/optim/adam"),
                                        ("mse_loss", "torch/nn/functional")),
        }, t).items()})

        final = s2.mesh
        start = time.perf_counter()
        export_glb(final, tmp / "out.glb")
        export_obj(final, tmp / "out.obj")
        out["export.export"] = time.perf_counter() - start
        start = time.perf_counter()
        frames = render_views(final, np.linspace(0, 360, cfg.output.turntable_frames, endpoint=False),
                              PREVIEW_ELEVATION, cfg.radius, size, cfg.fovy, ctx.mesh_backend)
        write_turntable(frames, tmp / "turntable.mp4")
        contact_sheet(final, tmp / "views.png", cfg.output.contact_sheet_views, cfg.radius, size,
                      cfg.fovy, ctx.mesh_backend)
        out["export.previews"] = time.perf_counter() - start
    return {k: (round(v, 3) if v is not None else None) for k, v in out.items()}


# ---------------------------------------------------------------------------------- report

def breakdown_report(modes=("off", "paper", "official", "fast"), seconds_modes=("off", "fast"),
                     iters: int = 500, iters_refine: int = 50, seed: int = 0, macs: dict | None = None,
                     small_iters: int = 60, small_iters_refine: int = 5, small_size: int = 64,
                     plot: str | None = None, repeats: int = 1, task: str = "image") -> dict:
    """The breakdown; ``macs``: a ``bench macs --json`` result to reuse (else computed).
    ``task="text"``: the MACs of a text run (SD 2.1 at 512 px, ``text_costs``); its CPU seconds
    are not profiled here (``seconds_modes`` is ignored)."""
    from hash3d_dg.bench.macs import macs_report

    if macs is None and task == "text":
        from hash3d_dg.bench.text_costs import text_macs_report

        macs = text_macs_report(iters, iters_refine, seed, modes=tuple(modes))
    elif macs is None:
        macs = macs_report(iters, iters_refine, seed, modes=tuple(modes))
    if task == "text":
        seconds_modes = ()
    tmacs = {m: macs_by_part(macs["modes"][m]) for m in modes if m in macs["modes"]}
    # Modes interleaved per repeat, each part's fastest kept: a shared machine's load then hits
    # every mode alike.
    seconds: dict[str, dict] = {}
    for _ in range(max(1, repeats)):
        for m in seconds_modes:
            run = cpu_seconds(m, small_iters, small_iters_refine, small_size, seed)
            best = seconds.setdefault(m, run)
            for k, v in run.items():
                if v is not None and (best.get(k) is None or v < best[k]):
                    best[k] = v
    report = {
        "parts": [f"{p}.{q}" for p, q in PARTS],
        "tmacs": {m: {"by_part": v, "total": round(sum(v.values()), 3),
                      "by_phase": _by_phase(v)} for m, v in tmacs.items()},
        "cpu_seconds": {m: {"by_part": v, "total": round(sum(x for x in v.values() if x), 3),
                            "by_phase": _by_phase(v)} for m, v in seconds.items()},
        "settings": {
            "task": task,
            "tmacs": f"default run: {macs['iters']} + {macs['iters_refine']} iterations at "
                     f"{macs.get('image_size', 256)} px guidance (bench macs --task {task}); networks only",
            "cpu_seconds": (f"small real run: built-in tiny model, {small_iters} + {small_iters_refine} "
                            f"iterations, {small_size} px, one torch thread, cProfile per phase; "
                            f"modes interleaved, fastest of {max(1, repeats)} per part"),
            "macs_modes": {m: {"cache_point": macs["modes"][m].get("cache_point"), "vae": macs["modes"][m].get("vae")}
                           for m in tmacs},
            "threads": torch.get_num_threads(),
        },
    }
    if plot:
        plot_breakdown(report, plot)
        report["plot"] = plot
    return report


def _by_phase(by_part: dict) -> dict:
    out: dict[str, float] = {}
    for key, value in by_part.items():
        phase = key.split(".")[0]
        out[phase] = round(out.get(phase, 0.0) + (value or 0.0), 3)
    return out


def plot_breakdown(report: dict, path: str) -> None:
    """Two stacked-bar panels: TMACs per mode, CPU seconds per measured mode, stacked by part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = report["parts"]
    # one hue family per phase, so parts of a phase read together and no two parts share a colour
    families = {"preprocess": "Greys", "stage1": "Oranges", "mesh": "Greens", "stage2": "Blues", "export": "Purples"}
    colours = {}
    for phase, cmap_name in families.items():
        members = [p for p in parts if p.startswith(phase + ".")]
        cmap = plt.get_cmap(cmap_name)
        for i, p in enumerate(members):
            colours[p] = cmap(0.35 + 0.6 * i / max(1, len(members) - 1)) if len(members) > 1 else cmap(0.6)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6), dpi=110)
    for ax, key, unit in ((axes[0], "tmacs", "TMACs (default run, networks)"),
                          (axes[1], "cpu_seconds", "CPU seconds (small real run, tiny model)")):
        modes = list(report[key])
        bottoms = [0.0] * len(modes)
        for part in parts:
            values = [report[key][m]["by_part"].get(part) or 0.0 for m in modes]
            if not any(values):
                continue
            ax.bar(modes, values, bottom=bottoms, color=colours[part], label=part, edgecolor="white", lw=0.3)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        for i, total in enumerate(bottoms):
            ax.text(i, total, f"{total:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle("Where a run's cost goes, per phase and Hash3D mode", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.82, 0.95))
    fig.savefig(path)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hash3d_dg.bench.macs import MODES

    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seconds-modes", nargs="+", default=["off", "fast"], choices=list(MODES),
                   help="modes of the small real run timed in CPU seconds (default off fast)")
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--iters-refine", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--macs-json", default=None, help="reuse a `bench macs --json` result instead of recounting")
    p.add_argument("--small-iters", type=int, default=60)
    p.add_argument("--small-iters-refine", type=int, default=5)
    p.add_argument("--small-size", type=int, default=64)
    p.add_argument("--plot", default=None, help="write the stacked-bar chart (PNG) here")
    p.add_argument("--repeats", type=int, default=1, help="small runs per mode, interleaved; fastest kept")
    p.add_argument("--task", default="image", choices=["image", "text"],
                   help="text: the MACs of a text run (SD 2.1, 512 px); no CPU seconds (default: image)")


def run_from_args(args) -> dict:
    import json

    torch.set_num_threads(1)
    macs = json.loads(Path(args.macs_json).read_text()) if args.macs_json else None
    return breakdown_report(tuple(args.modes), tuple(args.seconds_modes), args.iters, args.iters_refine,
                            args.seed, macs, args.small_iters, args.small_iters_refine, args.small_size,
                            args.plot, args.repeats, args.task)
