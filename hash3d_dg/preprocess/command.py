"""Command line: ``python -m hash3d_dg.preprocess IMAGE_OR_DIR`` writes ``<stem>_rgba.png``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path


from hash3d_dg.output.atomic import save_image_atomic
from hash3d_dg.errors import ConfigError, InputError, UserError
from hash3d_dg.preprocess.io import IMAGE_SUFFIXES, MATTING_METHODS, MIN_SIDE
from hash3d_dg.preprocess.prepare import prepare_image

logger = logging.getLogger(__name__)


def find_images(path_or_dir: str | os.PathLike[str]) -> list[Path]:
    """Images to process: a file gives ``[file]``; a folder gives its images, sorted by name.

    A folder is listed non-recursively; files with suffix .png/.jpg/.jpeg/.webp (any case) are
    taken, hidden files (names starting with '.') are skipped.

    Raises:
        InputError: the path does not exist, or the folder holds no images.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        images = sorted(
            entry
            for entry in path.iterdir()
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith(".")
        )
        if not images:
            raise InputError(f"no images (PNG, JPEG or WebP) in folder {path}: pass an image or a folder of images")
        return images
    if not path.exists():
        raise InputError(f"input image not found: {path} (check the path)")
    return [path]


def output_path(source: Path, output_dir: Path | None) -> Path:
    """Where the CLI writes a source image's result: ``<output_dir or its folder>/<name>_rgba.png``,
    ``name`` being the stem without a trailing ``_rgba``."""
    folder = output_dir if output_dir is not None else source.parent
    name = source.stem.removesuffix("_rgba") or source.stem  # cat_rgba.png -> cat_rgba.png, not cat_rgba_rgba.png
    target = folder / f"{name}_rgba.png"
    if target.resolve() == source.resolve():  # never overwrite the input itself
        target = folder / f"{source.stem}_rgba.png"
    return target


def _skip_previous_outputs(images: list[Path], output_dir: Path | None) -> tuple[list[Path], list[Path]]:
    """Split off ``<stem>_rgba.png`` files that are this tool's own earlier outputs.

    Only when the results go to the images' own folder: a file ``x_rgba.png`` is skipped when an
    image ``x.<ext>`` is in the same list (it is that image's earlier result).
    """
    stems = {image.stem for image in images}
    keep: list[Path] = []
    skipped: list[Path] = []
    for image in images:
        same_folder = output_dir is None or output_dir.resolve() == image.parent.resolve()
        if same_folder and image.name.endswith("_rgba.png") and image.name[: -len("_rgba.png")] in stems:
            skipped.append(image)
        else:
            keep.append(image)
    return keep, skipped


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hash3d_dg.preprocess",
        description="Cut out and centre the object of each image; writes <stem>_rgba.png (8-bit RGBA).",
    )
    parser.add_argument("image", metavar="IMAGE_OR_DIR", help="an image file or a folder of images")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (default 256)")
    parser.add_argument("--matting", choices=MATTING_METHODS, default="auto", help="how to find the object (default auto)")
    parser.add_argument("--fill", type=float, default=0.8, help="fraction of the canvas the object spans (default 0.8)")
    parser.add_argument("--output", type=Path, default=None, metavar="DIR", help="output folder (default: next to each image)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 if any image failed)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.size < MIN_SIDE:
            raise ConfigError(f"--size must be at least {MIN_SIDE}, got {args.size}")
        if not 0.0 < args.fill <= 1.0:
            raise ConfigError(f"--fill must be in (0, 1], got {args.fill}")
        if args.output is not None and args.output.exists() and not args.output.is_dir():
            raise ConfigError(f"--output {args.output} is a file, not a folder: pass a folder")
        images = find_images(args.image)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    images, skipped = _skip_previous_outputs(images, args.output)
    for image in skipped:
        print(f"{image}: skipped (an earlier result of this tool)")
    failures = 0
    for image in images:
        target = output_path(image, args.output)
        try:
            prepared = prepare_image(image, size=args.size, matting=args.matting, fill=args.fill)
            try:
                save_image_atomic(target, prepared.rgba)
            except OSError as error:
                raise InputError(f"cannot write {target}: {error.strerror or error}") from None
        except UserError as error:
            failures += 1
            print(f"error: {error}", file=sys.stderr)
            continue
        print(f"{image} -> {target} (matting: {prepared.matting}, {args.size}x{args.size})")
    return 2 if failures else 0


