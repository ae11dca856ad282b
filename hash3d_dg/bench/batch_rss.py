"""Memory over a long folder run: resident memory after each image of a smoke-config batch.

    python -m hash3d_dg.bench batch-rss [--images 20] [--save benchmarks/results/batch_rss_cpu.json]

Runs ``iter_images`` (the per-image loop ``main.py --image DIR`` uses) in this process over N
inputs made from the sample images in ``data/`` (each flipped / rotated differently so no two are
the same file), and records after each image the current RSS (VmRSS) and the peak so far (VmHWM)
from /proc/self/status, plus the Hash3D table's entries and bytes. Memory that does not grow with
the image index means nothing per image is kept (cache, guidance state, renders).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: data/ and configs/


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def make_inputs(folder: Path, count: int) -> list[Path]:
    from PIL import Image

    sources = sorted((ROOT / "data").glob("*.png"))
    ops = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270,
           Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_180, Image.Transpose.TRANSVERSE]
    paths = []
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as image:
            op = ops[(i // len(sources)) % len(ops)]
            out = image.transpose(op) if op is not None else image.copy()
        path = folder / f"img{i:02d}.png"
        out.save(path)
        paths.append(path)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    parser.add_argument("--save", type=Path, help="also write the figures (per image) here")


def run_from_args(args: argparse.Namespace) -> dict:

    import torch

    from hash3d_dg.config import load_config
    from hash3d_dg.pipeline import RunContext, iter_images

    torch.set_num_threads(1)
    cfg = load_config(args.config, ["output.save_video=false"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="batch-rss-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        images = make_inputs(tmp / "in", args.images)
        ctx = RunContext.create(cfg, progress=False)
        start = time.perf_counter()
        for index, result in enumerate(iter_images(images, ctx, tmp / "out"), start=1):
            gc.collect()
            cache = ctx.guidance().stats()["cache"] if ctx.guidance() is not None else {}
            row = {"image": index, "status": result.status, "rss_mb": round(_status_kb("VmRSS") / 1024, 1),
                   "peak_rss_mb": round(_status_kb("VmHWM") / 1024, 1),
                   "cache_entries": cache.get("entries", 0),
                   "cache_bytes": cache.get("bytes", 0),
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress; stdout carries the result
    first, last = rows[0], rows[-1]
    config = Path(args.config).resolve()
    config = str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config)
    summary = {"benchmark": "batch_rss", "config": config, "images": args.images,
               "rss_mb_image1": first["rss_mb"], "rss_mb_last": last["rss_mb"],
               "peak_rss_mb_image1": first["peak_rss_mb"], "peak_rss_mb_last": last["peak_rss_mb"],
               "rss_growth_mb_per_image_after_2": round((last["rss_mb"] - rows[min(1, len(rows) - 1)]["rss_mb"])
                                                        / max(1, len(rows) - 2), 2),
               "python": platform.python_version(), "torch": torch.__version__, "per_image": rows}
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(summary, indent=2) + "\n")
    failed = [r["image"] for r in rows if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"images {failed} failed in the batch")
    return {k: v for k, v in summary.items() if k != "per_image"}
