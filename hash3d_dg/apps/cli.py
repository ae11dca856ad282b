"""Command line: ``python main.py --image cat.png --hash3d`` or ``python main.py --prompt "a mug" --hash3d``.

An image runs the image-to-3D path (``configs/image.yaml`` by default, Zero-1-to-3 guidance); a
prompt (``--prompt TEXT``, or ``--prompts FILE`` with one prompt per line) runs text to 3D
(``configs/text.yaml`` by default, Stable Diffusion guidance), with the same stages, cache,
exports, reports, folders of work and Ray runs; a prompt's output name is a slug of it.

Flags are turned into config overrides on top of the YAML config; trailing ``key=value`` words
override any config key (``stage1.iters=300``, ``hash3d.eta=0.2``). A problem the user can fix
ends with one line on stderr and exit status 2; nothing half-written is left behind. A folder
(or several images) is run by ``pipeline.iter_images``, one image after the other from the same
fresh state; the run ends with a table of every input, its status and error line, and exit
status 2 if any failed. SIGINT (Ctrl-C) and SIGTERM stop a run with one line and exit status
130 / 143: the current image's staging folder and child processes are removed, an earlier result
of the same name is untouched, and images already finished stay.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from hash3d_dg.apps.common import (DEFAULT_CONFIG, DEFAULT_TEXT_CONFIG, EXIT_INTERRUPTED, EXIT_USER_ERROR,
                                   OneLineParser, collect_inputs, configure_logging, overrides_from_args,
                                   quiet_model_libraries, summary_line, text_mode)
from hash3d_dg.errors import ConfigError, RunInterrupted, UserError



def build_parser() -> argparse.ArgumentParser:
    from hash3d_dg.config import config_keys

    epilog = "config keys (override with key=value):\n  " + "\n  ".join(config_keys())
    p = OneLineParser(prog="main.py", description="One photo in, a textured 3D mesh (GLB) out.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    p.add_argument("--image", nargs="+", metavar="PATH",
                   help="input image(s) or a folder of images (PNG/JPEG/WebP; RGBA keeps its alpha)")
    p.add_argument("--prompt", metavar="TEXT",
                   help="text to 3D: what to make, e.g. \"a ceramic mug with a blue glaze\" (instead of --image)")
    p.add_argument("--prompts", metavar="FILE",
                   help="text to 3D for several prompts: a UTF-8 text file, one prompt per line")
    p.add_argument("--negative-prompt", metavar="TEXT",
                   help="with --prompt / --prompts: what to steer away from (default: config, empty)")
    p.add_argument("--config", default=None,
                   help=f"YAML config, a path or a name in configs/ (default: {DEFAULT_CONFIG} for an image, "
                        f"{DEFAULT_TEXT_CONFIG} for a prompt)")
    p.add_argument("--output", default="logs", help="output root; results go to OUTPUT/NAME/ (default: %(default)s)")
    p.add_argument("--name", help="output name (default: the image's file stem, or a slug of the prompt; single input only)")
    p.add_argument("--elevation", type=float, help="elevation of the input view in degrees, negative = from above (default: config, 0)")
    p.add_argument("--seed", type=int, help="random seed (default: config, 0)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: config, auto)")
    p.add_argument("--model", help="guidance model: hub id, local diffusers directory or builtin:tiny "
                                   "(default: config; ashawkey/stable-zero123-diffusers for an image, "
                                   "stabilityai/stable-diffusion-2-1-base for a prompt)")
    p.add_argument("--iters", type=int, help="stage-1 iterations (default: config, 500)")
    p.add_argument("--iters-refine", type=int, help="stage-2 iterations (default: config, 50)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--hash3d", dest="hash3d", action="store_true", default=None,
                       help="turn the Hash3D feature cache on (mode from --hash3d-mode, default paper)")
    group.add_argument("--no-hash3d", dest="hash3d", action="store_false",
                       help="turn the Hash3D feature cache off")
    p.add_argument("--hash3d-mode", choices=["paper", "official", "fast"],
                   help="cache behaviour: paper (adaptive grids, eta 0.1), official (one grid, eta 0.5, no stage-2 reuse) "
                        "or fast (beyond the paper: timestep fall-back, trajectory reuse, tiny VAE) (default: paper)")
    p.add_argument("--eta", type=float, help="retrieval probability of the cache (default: the mode's)")
    p.add_argument("--stage", choices=["all", "1", "2"], default="all",
                   help="all; 1 = preprocess + Gaussians only; 2 = mesh + refine reusing a stage-1 result (default: %(default)s)")
    p.add_argument("--backend-gaussian", choices=["auto", "torch", "gsplat", "inria"],
                   help="Gaussian rasterizer (default: config, auto = gsplat on CUDA else torch)")
    p.add_argument("--backend-mesh", choices=["auto", "torch", "nvdiffrast"],
                   help="mesh rasterizer (default: config, auto = nvdiffrast on CUDA else torch)")
    # Batch runs on Ray (hash3d_dg.apps.ray_batch): one actor per GPU, or --ray-workers CPU actors.
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the images on Ray: no ADDRESS = a local Ray instance, 'auto' or host:port = "
                        "an existing cluster; writes OUTPUT/batch_report.json")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="with --ray: number of workers (default: one per GPU, or 1 CPU worker without GPUs)")
    p.add_argument("--ray-gpus-per-worker", type=float, metavar="F",
                   help="with --ray: GPUs each worker reserves (default 1; 0.25 puts four workers on each "
                        "GPU for throughput, each with its own model copy)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --ray: rerun images whose complete result already exists (default: skip them)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


class _SignalGuard:
    """SIGINT and SIGTERM raise ``RunInterrupted`` in the main thread for the block.

    The exception unwinds the run like any other: the staging folder is removed, child processes
    are killed by ``subprocess``, and an earlier result is never touched. A second signal while
    that clean-up runs is ignored, so the clean-up finishes. A SIGINT that the parent process set
    to be ignored (a background job of a non-interactive shell) stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.fired = False

    def _handler(self, signum, frame) -> None:
        if self.fired:
            return
        self.fired = True
        raise RunInterrupted(signum)

    def __enter__(self) -> "_SignalGuard":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals are only delivered to the main thread
        for signum in self.SIGNALS:
            current = signal.getsignal(signum)
            if signum == signal.SIGINT and current == signal.SIG_IGN:
                continue
            self.previous[signum] = current
            signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _interrupt_line(exc: BaseException, current: str | None, finished: list[str]) -> str:
    name = exc.signal_name if isinstance(exc, RunInterrupted) else "SIGINT"
    where = f"nothing was written for {current}" if current else "nothing was written"
    kept = f"; {len(finished)} finished input(s) kept: {', '.join(finished)}" if finished else ""
    return f"error: interrupted by {name}: {where}{kept}"


def _check_output_root(root: Path) -> None:
    """The output root must be a folder we can create and write in (one line otherwise)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"output root {root} exists and is not a folder: pass a folder with --output") from None
    except OSError as exc:
        raise ConfigError(f"output root {root} cannot be created ({exc.strerror or exc}): "
                          "pass a writable folder with --output") from None
    if not root.is_dir():
        raise ConfigError(f"output root {root} is not a folder: pass a folder with --output")
    try:
        probe = tempfile.TemporaryDirectory(prefix=".write-test-", dir=root)
        probe.cleanup()
    except OSError as exc:
        raise ConfigError(f"output root {root} is not writable ({exc.strerror or exc}): "
                          "pass a writable folder with --output") from None


def split_image_words(words: list[str]) -> tuple[list[str], list[str]]:
    """``--image`` takes several words, so ``--image a.png stage1.iters=3`` swallows the
    override: a word that is not an existing path and looks like ``key=value`` is an override."""
    images, overrides = [], []
    for word in words:
        key = word.split("=", 1)[0]
        if "=" in word and not Path(word).exists() and key and all(c.isalnum() or c in "._-" for c in key):
            overrides.append(word)
        else:
            images.append(word)
    return images, overrides


def format_table(results) -> str:
    """The end-of-folder table: every input with its status and error line."""
    rows = [(str(r.image), r.status, r.error) for r in results]
    width_in = max(len("input"), *(len(r[0]) for r in rows))
    width_st = max(len("status"), *(len(r[1]) for r in rows))
    lines = [f"{'input':<{width_in}}  {'status':<{width_st}}  error"]
    lines += [f"{i:<{width_in}}  {st:<{width_st}}  {err}".rstrip() for i, st, err in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["app"]:  # `hash3d-dg app ...`: the web page
        from hash3d_dg.apps.web import main as app_main

        return app_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    try:
        if args.image is not None:
            image_words, extra = split_image_words(args.image)
            args.image, args.overrides = image_words, extra + list(args.overrides)
        text_mode(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.ray is not None:
        from hash3d_dg.apps import ray_batch as batch_ray

        return batch_ray.main(args)
    log = logging.getLogger("hash3d_dg")
    current: str | None = None
    finished: list[str] = []
    try:
        with _SignalGuard():
            try:
                from hash3d_dg.config import load_config
                from hash3d_dg.output.names import check_name, output_names

                cfg = load_config(args.config, overrides_from_args(args))
                images = collect_inputs(args)
                if args.name is not None and len(images) > 1:
                    raise ConfigError("--name needs a single input")
                if args.name is not None:  # checked before the output root is made
                    names = [check_name(args.name, args.output, what="--name", fix="pass another --name")]
                else:
                    names = output_names(images, args.output)
                _check_output_root(Path(args.output))
                quiet_model_libraries(args.debug)
                from hash3d_dg.pipeline import RunContext, iter_images

                ctx = RunContext.create(cfg, progress=not args.quiet)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_USER_ERROR

            log.info(ctx.describe())
            results = []
            started = time.perf_counter()
            current = names[0]
            for result in iter_images(images, ctx, args.output, names=names, stage=args.stage,
                                      debug=args.debug):
                results.append(result)
                if result.status == "ok":
                    finished.append(result.name)
                    log.info(summary_line(result.name, result.report))
                    log.info("outputs: " + ", ".join(sorted(Path(p).name for p in result.report["outputs"].values()))
                             + f" in {Path(args.output) / result.name}")
                elif result.status == "failed":
                    print(result.error, file=sys.stderr)
                current = names[len(results)] if len(results) < len(names) else None
    except (KeyboardInterrupt, RunInterrupted) as exc:
        print(_interrupt_line(exc, current, finished), file=sys.stderr)
        return exc.exit_code if isinstance(exc, RunInterrupted) else EXIT_INTERRUPTED

    failed = [r for r in results if r.status != "ok"]
    if len(images) > 1:
        log.info(f"done in {time.perf_counter() - started:.1f}s: {len(finished)} succeeded, "
                 f"{len(failed)} failed")
        log.info(format_table(results))
    return 0 if not failed else EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
