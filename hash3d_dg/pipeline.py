"""The end-to-end run: image -> preprocess -> stage 1 -> mesh -> stage 2 -> export.

``run_image`` reads top to bottom in that order. Its input is an image path (Zero-1-to-3
guidance) or a ``prompts.TextPrompt`` (Stable Diffusion guidance, ``guidance.type=sd``): a
prompt has no preprocess and no reference view; the rest is the same run. Everything a run needs that is shared between
several input images (device, backends, the guidance model) lives in a ``RunContext``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import platform
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hash3d_dg.output.atomic import save_image_atomic, write_json_atomic
from hash3d_dg.config import TINY_MODEL, RunConfig
from hash3d_dg.errors import ConfigError, InputError, UserError
from hash3d_dg.gaussians import load_ply, resolve_gaussian_backend, save_ply
from hash3d_dg.mesh import export_glb, export_obj, resolve_mesh_backend
from hash3d_dg.output.names import image_name
from hash3d_dg.output.folder import OutputFolder
from hash3d_dg.preprocess import PreparedImage, load_image, prepare_image
from hash3d_dg.output.previews import PREVIEW_ELEVATION, contact_sheet, render_views, write_turntable
from hash3d_dg.prompts import TextPrompt
from hash3d_dg.stages import ReferenceView, extract_textured_mesh, run_stage1, run_stage2

log = logging.getLogger(__name__)

STAGES = ("all", "1", "2")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available here: use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name == "float16" and device.type == "cpu":
        raise ConfigError("guidance.dtype float16 is not supported on CPU: use float32 or auto")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def tiny_model_dir(family: str = "stable", seed: int = 0) -> Path:
    """The built-in tiny random checkpoint (smoke runs), written on first use into the cache."""
    from hash3d_dg.guidance import write_tiny_checkpoint
    from hash3d_dg.guidance.loading import builtin_checkpoint_dir

    return builtin_checkpoint_dir(f"tiny-{family}-zero123-diffusers-{seed}",
                                  lambda folder: write_tiny_checkpoint(folder, family=family, seed=seed))


#: ``guidance.type`` -> the builder of that guidance, ``builder(cfg, device, dtype)`` (imported
#: on use: each brings its own model libraries); a builder that takes ``components`` wraps an
#: already loaded checkpoint (``RunContext.with_config``).
GUIDANCE_BUILDERS = {
    "sd": "hash3d_dg.guidance.sd:build_sd_guidance",
    "oracle": "hash3d_dg.eval.oracle:build_guidance",
}
#: Guidance types whose loaded checkpoint a web-app job may reuse (``RunContext.with_config``).
REUSABLE_MODELS = ("zero123", "sd")


def build_guidance(cfg: RunConfig, device: torch.device, dtype: torch.dtype, components=None):
    """The run's guidance (``guidance.type``), its denoiser wrapped by the Hash3D cache (or none
    when mode=off). Zero-1-to-3 by default.

    ``components``: an already loaded checkpoint of the same type to wrap instead of loading
    ``cfg.guidance.model``.
    """
    if cfg.guidance.type in GUIDANCE_BUILDERS:
        module, name = GUIDANCE_BUILDERS[cfg.guidance.type].split(":")
        extra = {"components": components} if components is not None else {}
        return getattr(importlib.import_module(module), name)(cfg, device, dtype, **extra)
    from hash3d_dg.cache import CachedDenoiser, make_cache
    from hash3d_dg.guidance.unet_split import UNetSplit
    from hash3d_dg.guidance import Zero123Guidance, load_zero123
    from hash3d_dg.guidance.loading import load_latent_vae

    if components is None:
        model = cfg.guidance.model
        family = cfg.guidance.family
        if model == TINY_MODEL:
            family = "stable" if family == "auto" else family
            model = str(tiny_model_dir(family))
        components = load_zero123(model, device=device, dtype=dtype, family=family)
    from hash3d_dg.guidance.acceleration import accelerate

    latent_vae = load_latent_vae(cfg.guidance, cfg.hash3d.mode, device, dtype)
    denoiser = CachedDenoiser(UNetSplit(components.unet, cfg.hash3d.cache_point),
                              make_cache(cfg.hash3d, seed=cfg.seed))
    guidance = Zero123Guidance(components, denoiser=denoiser, guidance_scale=cfg.guidance.guidance_scale,
                               image_size=cfg.guidance.image_size, seed=cfg.seed, latent_vae=latent_vae,
                               hash3d=cfg.hash3d)
    accelerate(guidance, cfg.guidance, device)  # channels_last, CUDA graphs (auto: on CUDA)
    return guidance


@dataclass
class RunContext:
    """What several images of one invocation share."""

    cfg: RunConfig
    device: torch.device
    dtype: torch.dtype
    gaussian_backend: str
    mesh_backend: str
    progress: bool = True
    _guidance: object = field(default=None, repr=False)

    @classmethod
    def create(cls, cfg: RunConfig, progress: bool = True) -> "RunContext":
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.guidance.dtype, device)
        try:
            gaussian_backend = resolve_gaussian_backend(cfg.stage1.backend, device)
            mesh_backend = resolve_mesh_backend(cfg.stage2.backend, device)
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
        cfg = copy.deepcopy(cfg)  # every render of the run uses the resolved backends
        cfg.stage1.backend, cfg.stage2.backend = gaussian_backend, mesh_backend
        return cls(cfg, device, dtype, gaussian_backend, mesh_backend, progress)

    def with_config(self, cfg: RunConfig) -> "RunContext":
        """A context for ``cfg`` (one web-app job's options) that reuses this context's loaded
        model when model, family, device and dtype agree; the Hash3D table and the guidance
        wrapper are built anew from ``cfg``, so no state of an earlier job carries over."""
        other = RunContext.create(cfg, progress=self.progress)
        same_model = cfg.guidance.type == self.cfg.guidance.type and cfg.guidance.type in REUSABLE_MODELS and (
            other.device, other.dtype, cfg.guidance.model, cfg.guidance.family) == (
            self.device, self.dtype, self.cfg.guidance.model, self.cfg.guidance.family)
        if same_model and self._guidance is not None and other.needs_guidance:
            other._guidance = build_guidance(other.cfg, other.device, other.dtype,
                                             components=self._guidance.components)
        return other

    @property
    def needs_guidance(self) -> bool:
        return self.cfg.guidance.lambda_zero123 > 0 and (self.cfg.stage1.iters > 0 or self.cfg.stage2.iters > 0)

    def guidance(self):
        """The guidance model, loaded on first use (None when guidance is switched off)."""
        if self._guidance is None and self.needs_guidance:
            self._guidance = build_guidance(self.cfg, self.device, self.dtype)
        return self._guidance

    def guidance_for_image(self):
        """The guidance with every per-image state reset, as if freshly built: an empty Hash3D
        table (and its retrieval generator) and the guidance's generator reseeded. Only the
        model weights carry over from one image of a folder to the next, so an image's result
        does not depend on its place in the folder."""
        guidance = self.guidance()
        if guidance is not None:
            guidance.reset(self.cfg.seed)
        return guidance

    def describe(self) -> str:
        cfg = self.cfg
        hash3d = cfg.hash3d.mode if cfg.hash3d.mode == "off" else (
            f"{cfg.hash3d.mode} (eta {cfg.hash3d.eta}, {len(cfg.hash3d.grids)} grid(s), "
            f"cache point {cfg.hash3d.cache_point}, stage 2 {cfg.hash3d.stage2})")
        model = (("the oracle object (guidance.type=oracle)" if cfg.guidance.type == "oracle" else cfg.guidance.model)
                 if self.needs_guidance else "none (lambda_zero123=0)")
        return (f"device {self.device} | dtype {str(self.dtype).replace('torch.', '')} | "
                f"gaussians: {self.gaussian_backend} | mesh: {self.mesh_backend} | "
                f"model: {model} | hash3d: {hash3d}")


def prepare_cuda_context(device: torch.device) -> threading.Thread | None:
    """On CUDA, when no context exists yet, create it in a background thread (a second or so
    that then overlaps preprocessing instead of delaying the model load); join the returned
    thread before the guidance loads. None elsewhere (the CPU changes nothing). A failure is left
    for the main thread's first CUDA call to report."""
    if device.type != "cuda" or torch.cuda.is_initialized():
        return None

    def create():
        try:
            torch.zeros(1, device=device)
        except Exception as exc:  # noqa: BLE001 - reported again by the main thread's first use
            log.debug("preparing the CUDA context failed: %s", exc)

    thread = threading.Thread(target=create, name="hash3d-cuda-context", daemon=True)
    thread.start()
    return thread


def _versions() -> dict:
    import diffusers
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _merge_unet_totals(*sections: dict) -> dict:
    full = sum(s.get("unet", {}).get("full_calls", 0) for s in sections)
    shallow = sum(s.get("unet", {}).get("shallow_calls", 0) for s in sections)
    return {"full_calls": full, "shallow_calls": shallow,
            "hit_rate": round(shallow / (full + shallow), 4) if full + shallow else 0.0}


def _load_stage1_result(out: OutputFolder, name: str, device) -> tuple[PreparedImage, object]:
    ply = out.final_path(f"{name}_gaussians.ply")
    rgba_png = out.final_path(f"{name}_rgba.png")
    if not ply.is_file() or not rgba_png.is_file():
        raise InputError(f"no stage-1 result for '{name}' in {out.final}: run with --stage 1 or "
                         f"--stage all first (expected {ply.name} and {rgba_png.name})")
    rgba = load_image(rgba_png)
    if rgba.shape[-1] != 4:
        raise InputError(f"{rgba_png} has no alpha channel: rerun stage 1")
    try:
        gaussians = load_ply(ply, device=device)
    except Exception as exc:  # a damaged PLY of ours: say which file
        raise InputError(f"cannot read {ply}: {exc}: rerun stage 1") from None
    prepared = PreparedImage(rgba=rgba, name=name, source=rgba_png, had_alpha=True, matting="alpha")
    return prepared, gaussians


def check_input_kind(source, cfg: RunConfig) -> None:
    """An image needs the Zero-1-to-3 guidance, a prompt the Stable Diffusion one (one line)."""
    if isinstance(source, TextPrompt) and cfg.guidance.type != "sd":
        raise ConfigError(f"a prompt needs the Stable Diffusion guidance, but guidance.type is "
                          f"{cfg.guidance.type!r}: use --config text.yaml (or guidance.type=sd)")
    if not isinstance(source, TextPrompt) and cfg.guidance.type == "sd":
        raise ConfigError("an image needs the Zero-1-to-3 guidance, but guidance.type is 'sd' (text to 3D): "
                          "pass --prompt, or use --config image.yaml for an image")
    if isinstance(source, TextPrompt) and not cfg.guidance.lambda_zero123 > 0:
        raise ConfigError("a prompt run needs its guidance (guidance.lambda_zero123 > 0): a prompt has no "
                          "reference view to fit")


def _load_stage1_gaussians(out: OutputFolder, name: str, device):
    """The Gaussians of an earlier stage-1 run of a prompt (copied into the new folder)."""
    ply = out.final_path(f"{name}_gaussians.ply")
    if not ply.is_file():
        raise InputError(f"no stage-1 result for '{name}' in {out.final}: run with --stage 1 or "
                         f"--stage all first (expected {ply.name})")
    try:
        gaussians = load_ply(ply, device=device)
    except Exception as exc:  # a damaged PLY of ours: say which file
        raise InputError(f"cannot read {ply}: {exc}: rerun stage 1") from None
    shutil.copy2(ply, out.path(ply.name))  # the folder is replaced whole
    return gaussians


def run_image(image_path: str | Path | TextPrompt, ctx: RunContext, output_root: str | Path = "logs",
              name: str | None = None, stage: str = "all", progress_callback=None) -> dict:
    """Run the product on one image or one prompt; returns the report (also written as
    <name>_report.json).

    ``image_path``: an image file, or a ``TextPrompt`` (text to 3D with ``guidance.type=sd``:
    no preprocess, no reference view; the training camera at (elevation, azimuth 0, radius)
    faces +z, which is the export's front; the report holds ``prompt`` and ``negative_prompt``).

    ``progress_callback``, if given, receives one dict per event: ``{"stage": "preprocess",
    "rgba": [H, W, 4] float array}`` once an image input is prepared, each stage iteration (see
    ``run_stage1``), and ``{"stage": "mesh"}`` / ``{"stage": "export"}`` as those phases start.
    """
    notify = progress_callback or (lambda event: None)
    cfg = ctx.cfg
    check_input_kind(image_path, cfg)
    prompt = image_path if isinstance(image_path, TextPrompt) else None
    if prompt is None:
        image_path = Path(image_path)
    name = name or (prompt.slug if prompt is not None else image_name(image_path))
    t_start = time.perf_counter()
    report: dict = {"name": name, "input": str(image_path) if prompt is None else "prompt", "stage": stage,
                    "config": cfg.to_dict(), "device": str(ctx.device),
                    "dtype": str(ctx.dtype).replace("torch.", ""),
                    "backends": {"gaussian": ctx.gaussian_backend, "mesh": ctx.mesh_backend},
                    "model": cfg.guidance.model if ctx.needs_guidance else None,
                    "hash3d": {"mode": cfg.hash3d.mode, **{k: v for k, v in cfg.to_dict()["hash3d"].items() if k != "mode"}},
                    "versions": _versions()}
    if prompt is not None:
        report.update(prompt=prompt.text, negative_prompt=cfg.guidance.negative_prompt)
    with OutputFolder(output_root, name) as out:
        # 1. Preprocess (or reuse a stage-1 result); a prompt has neither image nor preprocess.
        cuda_context = prepare_cuda_context(ctx.device)  # meanwhile, on CUDA
        t0 = time.perf_counter()
        if prompt is not None:
            gaussians = _load_stage1_gaussians(out, name, ctx.device) if stage == "2" else None
            ref = ReferenceView.camera_only(cfg.elevation, cfg.radius, cfg.fovy, cfg.stage1.ref_size, ctx.device)
        else:
            if stage == "2":
                log.info(f"[{name}] loading the stage-1 result")
                prepared, gaussians = _load_stage1_result(out, name, ctx.device)
                for fname in (f"{name}_gaussians.ply", f"{name}_rgba.png"):  # the folder is replaced whole
                    shutil.copy2(out.final_path(fname), out.path(fname))
            else:
                log.info(f"[{name}] preprocess")
                prepared = prepare_image(image_path, size=cfg.stage1.ref_size, matting=cfg.matting)
                gaussians = None
                save_image_atomic(out.path(f"{name}_rgba.png"), prepared.rgba)
            report["preprocess"] = {"seconds": round(time.perf_counter() - t0, 3),
                                    "had_alpha": prepared.had_alpha, "matting": prepared.matting}
            notify({"stage": "preprocess", "rgba": prepared.rgba})
            ref = ReferenceView.from_rgba(prepared.rgba, cfg.elevation, cfg.radius, cfg.fovy,
                                          cfg.stage1.ref_size, ctx.device)
        # 1b. Load the guidance model (first image of a run only) and set its reference.
        t0 = time.perf_counter()
        if cuda_context is not None:
            cuda_context.join()
        guidance = ctx.guidance_for_image()
        if guidance is not None:
            report["model_family"] = guidance.family
            if prompt is not None:
                guidance.set_reference(None, cfg.elevation)
                guidance.set_prompt(prompt.text, cfg.guidance.negative_prompt)
                report["prompt_truncated"] = bool(guidance.truncated)
            else:
                guidance.set_reference(ref.image_nchw(), cfg.elevation)
        report["load"] = {"seconds": round(time.perf_counter() - t0, 3)}

        # 2. Stage 1: Gaussians.
        if stage in ("all", "1"):
            log.info(f"[{name}] stage 1: {cfg.stage1.iters} iterations")
            s1 = run_stage1(ref, cfg, guidance, progress=ctx.progress, progress_callback=progress_callback)
            gaussians = s1.gaussians
            report["stage1"] = s1.report
            save_ply(gaussians, out.path(f"{name}_gaussians.ply"))

        # 3. Mesh and 4. stage 2; 5. export.
        if stage in ("all", "2"):
            log.info(f"[{name}] mesh")
            notify({"stage": "mesh"})
            mesh, report["mesh"] = extract_textured_mesh(gaussians, cfg)
            if guidance is not None:
                guidance.clear_cache()  # stage 2 starts with an empty table
            log.info(f"[{name}] stage 2: {cfg.stage2.iters} iterations")
            s2 = run_stage2(mesh, ref, cfg, guidance, progress=ctx.progress, progress_callback=progress_callback)
            mesh = s2.mesh
            report["stage2"] = s2.report
            log.info(f"[{name}] export")
            notify({"stage": "export"})
            t0 = time.perf_counter()
            export_glb(mesh, out.path(f"{name}.glb"))
            export_obj(mesh, out.path(f"{name}.obj"))
            size, o = cfg.output.preview_size, cfg.output
            frames = render_views(mesh, np.linspace(0, 360, o.turntable_frames, endpoint=False),
                                  PREVIEW_ELEVATION, cfg.radius, size, cfg.fovy, ctx.mesh_backend)
            if o.save_video:
                write_turntable(frames, out.path(f"{name}_turntable.mp4"))
            reference = (np.clip(ref.rgb.cpu().numpy(), 0, 1) * 255).round().astype(np.uint8) if ref.has_image else None
            contact_sheet(mesh, out.path(f"{name}_views.png"), o.contact_sheet_views, cfg.radius,
                          size, cfg.fovy, ctx.mesh_backend, reference=reference)
            report["export"] = {"seconds": round(time.perf_counter() - t0, 3)}

        report["unet_total"] = _merge_unet_totals(report.get("stage1", {}), report.get("stage2", {}))
        report["total_seconds"] = round(time.perf_counter() - t_start, 3)
        staged = sorted(p.name for p in out.staging.iterdir()) + [f"{name}_report.json"]
        report["outputs"] = {fname: str(out.final_path(fname)) for fname in staged}
        write_json_atomic(out.path(f"{name}_report.json"), report)
        out.commit()
    return report



@dataclass
class ImageResult:
    """What became of one input of a folder run."""

    image: Path | TextPrompt  # the input: an image file or a prompt
    name: str
    status: str  # "ok" | "failed" | "not run"
    error: str = ""  # the one-line error of a failed input
    report: dict | None = field(default=None, repr=False)


def error_line(exc: BaseException, image: str | Path, hint: str = "rerun with --debug for details") -> str:
    """The one line a failed image gets (the CLI, the web app and the Ray runner alike)."""
    if isinstance(exc, UserError):
        return f"error: {exc}"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"error: internal error on {image}: {type(exc).__name__}: {first} ({hint})"


def iter_images(images: list[Path], ctx: RunContext, output_root: str | Path = "logs",
                names: list[str] | None = None, stage: str = "all", debug: bool = False):
    """Run ``run_image`` on each input in turn; yields an ``ImageResult`` per input.

    Every image starts from the same state (``RunContext.guidance_for_image``). A bad input or a
    diverged run fails that input only; a configuration or model problem (it would fail every
    other input the same way) marks the rest "not run". An internal error fails that input
    with a one-line message (re-raised when ``debug``). An interrupt (``KeyboardInterrupt``,
    ``RunInterrupted``) propagates: the inputs yielded so far are complete on disk.
    """
    from hash3d_dg.errors import DivergenceError, OutputError, UserError
    from hash3d_dg.output.names import check_name, output_names

    # Every name checked before any work (a bad or shared name fails the call, not one input).
    names = [check_name(n, output_root) for n in names] if names else output_names(images, output_root)
    stop_reason = ""
    for image, name in zip(images, names):
        image = image if isinstance(image, TextPrompt) else Path(image)
        if stop_reason:
            yield ImageResult(image, name, "not run", stop_reason)
            continue
        try:
            log.info(f"[{name}] {image}")
            report = run_image(image, ctx, output_root, name=name, stage=stage)
        except UserError as exc:
            yield ImageResult(image, name, "failed", error_line(exc, image))
            if not isinstance(exc, (InputError, DivergenceError, OutputError)) or isinstance(exc, ConfigError):
                stop_reason = f"{name} failed with a setup error that would fail this input too"
            continue
        except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
            if debug:
                raise
            yield ImageResult(image, name, "failed", error_line(exc, image))
            continue
        yield ImageResult(image, name, "ok", report=report)


def run_images(images: list[Path], ctx: RunContext, output_root: str | Path = "logs",
               names: list[str] | None = None, stage: str = "all", debug: bool = False) -> list[ImageResult]:
    """``iter_images`` collected into a list (one ``ImageResult`` per input, in order)."""
    return list(iter_images(images, ctx, output_root, names=names, stage=stage, debug=debug))
