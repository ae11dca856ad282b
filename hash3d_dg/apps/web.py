"""Web app: ``python -m hash3d_dg.apps.web --config configs/smoke.yaml`` (or ``hash3d-dg app``).

A gradio page over the same ``RunContext`` / ``run_image`` the CLI uses: drop a photo (or pick
one of ``data/``), or type a prompt in the box beside it (text to 3D with ``--text-config``,
default ``text.yaml``; its model is loaded on the first prompt), set the few options people
touch, press one button, watch the stage loops' own progress, then turn the GLB around, play the
turntable, look at the 8-view sheet and download the files. The guidance model is loaded once,
before the page is served; each job gets a context derived from it (``RunContext.with_config``), its own output folder, and runs alone (gradio's
queue, one job at a time). Scripts use the named endpoint ``/generate``::

    from gradio_client import Client, handle_file
    glb, *rest = Client("http://127.0.0.1:7860/").predict(handle_file("cat.png"), api_name="/generate")
    glb, *rest = Client("http://127.0.0.1:7860/").predict(None, prompt="a ceramic mug", api_name="/generate")

Bound to 127.0.0.1 unless ``--host`` says otherwise; ``--share`` (a public gradio link) is off
unless asked for.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hash3d_dg.cache.config import MODES
from hash3d_dg.errors import ConfigError, UserError

log = logging.getLogger("hash3d_dg.apps.web")

DEFAULT_CONFIG = "image.yaml"
DEFAULT_TEXT_CONFIG = "text.yaml"
DEFAULT_OUTPUT = "logs/app"
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
HASH3D_MODES = MODES  # off, paper, official, fast (hash3d_dg.cache.config)
STAGE_LABELS = {"preprocess": "preprocess", "stage1": "stage 1 (gaussians)", "mesh": "mesh (extract, unwrap, bake)",
                "stage2": "stage 2 (mesh refine)", "export": "export (GLB, OBJ, previews)"}


def build_parser() -> argparse.ArgumentParser:
    from hash3d_dg.apps.common import OneLineParser

    p = OneLineParser(prog="python -m hash3d_dg.apps.web", description="Web page: one photo in, a textured 3D mesh (GLB) out.")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="YAML config, a path or a name in configs/ (default: %(default)s)")
    p.add_argument("--text-config", default=DEFAULT_TEXT_CONFIG,
                   help="YAML config of prompt jobs (text to 3D; default: %(default)s; "
                        "configs/text_smoke.yaml beside configs/smoke.yaml)")
    p.add_argument("--output", default=DEFAULT_OUTPUT,
                   help="output root; each job writes OUTPUT/<photo>-<time>-<id>/ (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also open a public gradio share link (off by default)")
    p.add_argument("--debug", action="store_true", help="verbose logging")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (as for main.py)")
    return p



def error_line(exc: BaseException, image) -> str:
    """The one line the CLI prints for a failed image, pointing at the server log."""
    from hash3d_dg.pipeline import error_line as line

    return line(exc, image, hint="see the server log")


@dataclass
class JobResult:
    name: str
    folder: Path
    report: dict
    summary: str

    def file(self, suffix: str) -> Path:
        return self.folder / f"{self.name}{suffix}"


def zip_obj(folder: Path, name: str) -> Path:
    """``<name>_obj.zip`` holding the OBJ, its MTL and texture (written atomically)."""
    from hash3d_dg.output.atomic import atomic_path

    members = [folder / f"{name}.obj", folder / f"{name}.mtl", folder / f"{name}_albedo.png"]
    target = folder / f"{name}_obj.zip"
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for member in members:
                if member.is_file():
                    zf.write(member, arcname=member.name)
    return target


class JobRunner:
    """Turns one photo (or one prompt) plus the page's options into one run of ``run_image``.

    Holds the base config (``--config`` + trailing overrides), the process's ``RunContext``
    (model loaded once, by :meth:`load`), the text config (``--text-config`` + the same
    overrides) and its context (its model loaded on the first prompt job), and the output root.
    ``run`` is serialised by a lock, so even a job whose page was closed mid-run finishes before
    the next one starts.
    """

    def __init__(self, config: str, overrides: list[str], output_root: str | Path,
                 text_config: str = DEFAULT_TEXT_CONFIG) -> None:
        from hash3d_dg.config import load_config
        from hash3d_dg.pipeline import RunContext

        self.config = config
        self.text_config = text_config
        self.overrides = list(overrides)
        self.output_root = Path(output_root).resolve()
        self.base_cfg = load_config(config, self.overrides)
        self.ctx = RunContext.create(self.base_cfg, progress=False)
        self.text_ctx = RunContext.create(load_config(text_config, self.overrides), progress=False)
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the guidance model now (once per process)."""
        self.ctx.guidance()

    def defaults(self) -> dict:
        cfg = self.base_cfg
        return {"hash3d_mode": cfg.hash3d.mode, "stage1_iters": cfg.stage1.iters,
                "stage2_iters": cfg.stage2.iters, "elevation": cfg.elevation, "seed": cfg.seed,
                "remove_background": cfg.matting != "alpha"}

    def job_config(self, hash3d_mode: str, stage1_iters, stage2_iters, elevation, seed, remove_background: bool,
                   text: bool = False, negative_prompt: str = ""):
        """The run config of one job; ``text``: a prompt job (``--text-config``, the negative
        prompt; the background option does not apply)."""
        import json

        from hash3d_dg.config import load_config

        if hash3d_mode not in HASH3D_MODES:
            raise ConfigError(f"Hash3D mode must be one of {', '.join(HASH3D_MODES)}, got {hash3d_mode!r}")
        job = [f"hash3d.mode={hash3d_mode}", f"stage1.iters={int(stage1_iters)}",
               f"stage2.iters={int(stage2_iters)}", f"elevation={float(elevation)}", f"seed={int(seed)}"]
        if text:
            negative = " ".join(str(negative_prompt or "").split())
            return load_config(self.text_config, self.overrides + job + [f"guidance.negative_prompt={json.dumps(negative)}"])
        if not remove_background:
            job.append("matting=alpha")  # keep the photo's own alpha; no background removal
        elif self.base_cfg.matting == "alpha":
            job.append("matting=auto")
        return load_config(self.config, self.overrides + job)

    def job_name(self, photo: Path) -> str:
        """``<photo>-<time>-<id>``; a photo name that would make an unusable output name
        (``names.check_name``) is replaced by its slug."""
        from hash3d_dg.output.names import check_name, image_name, name_problem, slugify

        tail = f"-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        name = image_name(photo) + tail
        if name_problem(name, self.output_root):
            name = slugify(image_name(photo), fallback="photo") + tail
        return check_name(name, self.output_root)

    def prompt_job_name(self, prompt) -> str:
        """``<slug of the prompt>-<time>-<id>``."""
        from hash3d_dg.output.names import check_name

        return check_name(f"{prompt.slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", self.output_root)

    def run(self, photo, cfg, progress_callback=None) -> JobResult:
        """One job: ``photo`` is an image path or a ``prompts.TextPrompt``."""
        from hash3d_dg.apps.common import summary_line
        from hash3d_dg.pipeline import run_image
        from hash3d_dg.prompts import TextPrompt

        text = isinstance(photo, TextPrompt)
        photo = photo if text else Path(photo)
        with self._lock:
            base = self.text_ctx if text else self.ctx
            base.guidance()  # the model of its kind, loaded once per process
            ctx = base.with_config(cfg)
            name = self.prompt_job_name(photo) if text else self.job_name(photo)
            report = run_image(photo, ctx, self.output_root, name=name, progress_callback=progress_callback)
            folder = self.output_root / name
            zip_obj(folder, name)
        return JobResult(name=name, folder=folder, report=report, summary=summary_line(name, report))


def progress_text(event: dict) -> str:
    """What the progress bar says for one event of ``run_image``."""
    label = STAGE_LABELS.get(event["stage"], event["stage"])
    if "step" not in event:
        return label
    text = f"{label}: iteration {event['step']}/{event['total']}, loss {event['loss']:.4g}"
    if event.get("hit_rate") is not None and event.get("cached"):
        text += f", cache hit rate {event['hit_rate']:.0%}"
    return text


def _rgba_uint8(rgba: np.ndarray) -> np.ndarray:
    return (np.clip(rgba, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def build_app(runner: JobRunner):
    """The gradio Blocks page (not launched)."""
    import gradio as gr

    d = runner.defaults()
    examples = sorted(str(p) for p in DATA_DIR.glob("*.png")) if DATA_DIR.is_dir() else []

    def generate(photo, hash3d_mode=d["hash3d_mode"], stage1_iters=d["stage1_iters"],
                 stage2_iters=d["stage2_iters"], elevation=d["elevation"], seed=d["seed"],
                 remove_background=d["remove_background"], prompt=None, negative_prompt=None,
                 progress=gr.Progress()):
        """Photo (or prompt) in; GLB, preprocessed input, turntable, 8-view sheet, downloads and
        summary out."""
        from hash3d_dg.prompts import TextPrompt

        n_out = 8
        raw = "" if prompt is None else str(prompt)
        typed = bool(raw.strip())
        if photo and typed:
            raise gr.Error("error: pass either a photo (photo to 3D) or a prompt (text to 3D), not both: "
                           "clear one of them", duration=None)
        if not photo and not raw:
            raise gr.Error("error: no photo and no prompt: upload a photo, pick an example or type a prompt",
                           duration=None)
        typed = typed or not photo  # a prompt of blanks alone: the prompt's own one-line error
        try:
            if typed:
                photo = TextPrompt(prompt, source="page")
            cfg = runner.job_config(hash3d_mode, stage1_iters, stage2_iters, elevation, seed, remove_background,
                                    text=typed, negative_prompt=negative_prompt)
        except UserError as exc:
            raise gr.Error(f"error: {exc}", duration=None) from None
        cached = cfg.hash3d.mode != "off"
        events: queue.Queue = queue.Queue()

        def work():
            try:
                events.put(("done", runner.run(photo, cfg, lambda e: events.put(("event", e)))))
            except BaseException as exc:  # noqa: BLE001 - reported as one line in the page
                if not isinstance(exc, UserError):
                    log.exception("job on %s failed", photo)
                events.put(("error", error_line(exc, photo if typed else Path(photo).name)))

        threading.Thread(target=work, name="hash3d-dg-job", daemon=True).start()
        progress(None, desc="waiting for the model")
        while True:
            kind, payload = events.get()
            if kind == "event":
                payload = {**payload, "cached": cached}
                if payload["stage"] == "preprocess":
                    progress(None, desc=progress_text(payload))
                    yield (gr.skip(), _rgba_uint8(payload["rgba"])) + (gr.skip(),) * (n_out - 2)
                elif "step" in payload:
                    progress((payload["step"], payload["total"]), desc=progress_text(payload), unit="iterations")
                else:
                    progress(None, desc=progress_text(payload))
                continue
            if kind == "error":
                yield (None, gr.skip(), None, None, None, None, None, payload)
                raise gr.Error(payload, duration=None)
            result: JobResult = payload
            log.info(result.summary)
            video = result.file("_turntable.mp4")
            rgba = result.file("_rgba.png")
            yield (str(result.file(".glb")), str(rgba) if rgba.is_file() else None,
                   str(video) if video.is_file() else None, str(result.file("_views.png")),
                   str(result.file("_obj.zip")), str(result.file("_gaussians.ply")),
                   str(result.file("_report.json")), result.summary)
            return

    with gr.Blocks(title="hash3d-dg: photo to 3D", analytics_enabled=False) as demo:
        gr.Markdown("# hash3d-dg\nOne photo (or a prompt) in, a textured 3D mesh out (DreamGaussian + "
                    "Zero-1-to-3 or Stable Diffusion guidance + the Hash3D feature cache).")
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.File(label="Photo (PNG / JPEG / WebP; RGBA keeps its alpha)",
                                file_types=[".png", ".jpg", ".jpeg", ".webp"], type="filepath",
                                elem_id="photo")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[photo], label="Examples from data/")
                prompt = gr.Textbox(label="Or a prompt (text to 3D, instead of a photo)", lines=1,
                                    placeholder="a ceramic mug with a blue glaze", elem_id="prompt")
                negative_prompt = gr.Textbox(label="Negative prompt (with a prompt)", lines=1, elem_id="negative-prompt")
                hash3d_mode = gr.Radio(list(HASH3D_MODES), value=d["hash3d_mode"], label="Hash3D mode",
                                       elem_id="hash3d-mode")
                with gr.Row():
                    stage1_iters = gr.Number(value=d["stage1_iters"], precision=0, minimum=0,
                                             label="Stage 1 iterations (Gaussians)")
                    stage2_iters = gr.Number(value=d["stage2_iters"], precision=0, minimum=0,
                                             label="Stage 2 iterations (mesh)")
                with gr.Row():
                    elevation = gr.Slider(-89, 89, value=d["elevation"], step=1,
                                          label="Input elevation (deg, negative = from above)")
                    seed = gr.Number(value=d["seed"], precision=0, label="Seed")
                remove_background = gr.Checkbox(value=d["remove_background"],
                                                label="Remove background (off: use the photo's alpha)")
                button = gr.Button("Generate 3D", variant="primary", elem_id="generate-btn")
                preprocessed = gr.Image(label="Preprocessed input", image_mode="RGBA", type="numpy",
                                        interactive=False, elem_id="preprocessed")
            with gr.Column(scale=2):
                with gr.Row():
                    model3d = gr.Model3D(label="Result (GLB)", clear_color=(1.0, 1.0, 1.0, 1.0),
                                         elem_id="model3d", height=380, scale=3)
                    turntable = gr.Video(label="Turntable", interactive=False, elem_id="turntable",
                                         height=380, scale=2)
                summary = gr.Textbox(label="Summary", interactive=False, elem_id="summary")
                with gr.Row():
                    glb_btn = gr.DownloadButton("GLB", elem_id="download-glb")
                    obj_btn = gr.DownloadButton("OBJ (zip)", elem_id="download-obj")
                    ply_btn = gr.DownloadButton("Gaussians (PLY)", elem_id="download-ply")
                    report_btn = gr.DownloadButton("Report (JSON)", elem_id="download-report")
                views = gr.Image(label="8 views", type="filepath", interactive=False, elem_id="views")
        # The GLB reaches the 3D viewer in a second step: gradio 6.31's Model3D draws nothing
        # when its value comes from a generator (checked in headless Chromium).
        button.click(generate,
                     inputs=[photo, hash3d_mode, stage1_iters, stage2_iters, elevation, seed, remove_background,
                             prompt, negative_prompt],
                     outputs=[glb_btn, preprocessed, turntable, views, obj_btn, ply_btn, report_btn, summary],
                     api_name="generate", concurrency_limit=1
                     ).success(lambda glb: glb, inputs=[glb_btn], outputs=[model3d], api_visibility="private",
                               show_progress="hidden")
    return demo


def main(argv: list[str] | None = None) -> int:
    from hash3d_dg.apps.common import EXIT_USER_ERROR, configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.debug)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        runner = JobRunner(args.config, args.overrides, args.output, text_config=args.text_config)
        log.info(runner.ctx.describe())
        runner.load()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    demo = build_app(runner)
    demo.queue(default_concurrency_limit=1)
    allowed = [str(runner.output_root)] + ([str(DATA_DIR)] if DATA_DIR.is_dir() else [])
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                    allowed_paths=allowed, show_error=True, quiet=False)
    except OSError as exc:  # port taken, address not available
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
