"""Command line: ``python main.py --image cat.png --hash3d``.

Flags are turned into config overrides on top of the YAML config; trailing ``key=value`` words
override any config key (``stage1.iters=300``, ``hash3d.eta=0.2``). A problem the user can fix
ends with one line on stderr and exit status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from hash3d_dg.errors import ConfigError, InputError, UserError

DEFAULT_CONFIG = "image.yaml"
EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from hash3d_dg.config import config_keys

    epilog = "config keys (override with key=value):\n  " + "\n  ".join(config_keys())
    p = _Parser(prog="main.py", description="One photo in, a textured 3D mesh (GLB) out.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    p.add_argument("--image", nargs="+", required=True, metavar="PATH",
                   help="input image(s) or a folder of images (PNG/JPEG/WebP; RGBA keeps its alpha)")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="YAML config, a path or a name in configs/ (default: %(default)s)")
    p.add_argument("--output", default="logs", help="output root; results go to OUTPUT/NAME/ (default: %(default)s)")
    p.add_argument("--name", help="output name (default: the image's file stem; single image only)")
    p.add_argument("--elevation", type=float, help="elevation of the input view in degrees, negative = from above (default: config, 0)")
    p.add_argument("--seed", type=int, help="random seed (default: config, 0)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: config, auto)")
    p.add_argument("--model", help="Zero-1-to-3 model: hub id, local diffusers directory or builtin:tiny "
                                   "(default: config, ashawkey/stable-zero123-diffusers)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Flags as config overrides, applied before the explicit key=value words."""
    pairs = []
    simple = {"elevation": "elevation", "seed": "seed", "device": "device", "model": "guidance.model",
              "iters": "stage1.iters", "iters_refine": "stage2.iters", "eta": "hash3d.eta",
              "backend_gaussian": "stage1.backend", "backend_mesh": "stage2.backend"}
    for attr, key in simple.items():
        value = getattr(args, attr)
        if value is not None:
            pairs.append(f"{key}={value}")
    if args.hash3d is False:
        if args.hash3d_mode or args.eta is not None:
            raise ConfigError("--no-hash3d cannot be combined with --hash3d-mode or --eta")
        pairs.append("hash3d.mode=off")
    elif args.hash3d or args.hash3d_mode:
        pairs.append(f"hash3d.mode={args.hash3d_mode or 'paper'}")
    return pairs + list(args.overrides)


def configure_logging(debug: bool, stream=None) -> None:
    """Our INFO lines to ``stream`` (stdout by default); library chatter and warnings off."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("hash3d_dg")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    if not debug:
        warnings.filterwarnings("ignore")
        for name in ("diffusers", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            import diffusers
            import transformers

            diffusers.utils.logging.set_verbosity_error()
            transformers.utils.logging.set_verbosity_error()
            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass


def _summary_line(name: str, report: dict) -> str:
    parts = [f"{name}: {report['total_seconds']:.1f}s"]
    for key in ("stage1", "mesh", "stage2"):
        if key in report:
            parts.append(f"{key} {report[key]['seconds']:.1f}s")
    unet = report.get("unet_total", {})
    if unet.get("full_calls", 0) + unet.get("shallow_calls", 0):
        parts.append(f"UNet full {unet['full_calls']} / shallow {unet['shallow_calls']} "
                     f"(cache hit rate {unet['hit_rate']:.1%})")
    if "stage1" in report:
        parts.append(f"ref PSNR {report['stage1']['ref_psnr']:.2f} dB")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    log = logging.getLogger("hash3d_dg")
    try:
        from hash3d_dg.config import load_config
        from hash3d_dg.preprocess import find_images

        cfg = load_config(args.config, overrides_from_args(args))
        images: list[Path] = []
        for item in args.image:
            images += find_images(item)
        if args.name and len(images) > 1:
            raise ConfigError("--name needs a single input image")
        from hash3d_dg.pipeline import RunContext, run_image

        ctx = RunContext.create(cfg, progress=not args.quiet)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR

    log.info(ctx.describe())
    succeeded, failed = [], []
    started = time.perf_counter()
    for image in images:
        name = args.name or image.stem.removesuffix("_rgba")
        try:
            log.info(f"[{name}] {image}")
            report = run_image(image, ctx, args.output, name=name, stage=args.stage)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed.append(image)
            if isinstance(exc, ConfigError) or not isinstance(exc, InputError):
                break  # a model or config problem fails every other input the same way
            continue
        except KeyboardInterrupt:
            print("error: interrupted; nothing was written for the current input", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
            if args.debug:
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(f"error: internal error on {image}: {type(exc).__name__}: {first} "
                  "(rerun with --debug for details)", file=sys.stderr)
            failed.append(image)
            continue
        succeeded.append(image)
        log.info(_summary_line(name, report))
        log.info("outputs: " + ", ".join(sorted(Path(p).name for p in report["outputs"].values()))
                 + f" in {Path(args.output) / name}")
    if len(images) > 1:
        log.info(f"done in {time.perf_counter() - started:.1f}s: {len(succeeded)} succeeded, "
                 f"{len(failed)} failed" + (": " + ", ".join(str(f) for f in failed) if failed else ""))
    return 0 if not failed else EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
