"""What a person looks at first: a turntable video of the mesh and a contact sheet of views."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hash3d_dg.output.atomic import atomic_path
from hash3d_dg.camera import Camera
from hash3d_dg.mesh import Mesh, rasterize_mesh

log = logging.getLogger(__name__)

PREVIEW_ELEVATION = -15.0  # slightly from above


def render_views(mesh: Mesh, azimuths, elevation: float, radius: float, size: int, fovy: float,
                 backend: str = "auto") -> list[np.ndarray]:
    """uint8 [size, size, 3] renders of the textured mesh over white, one per azimuth
    (mip-mapped texture lookups and antialiased edges: a 1024-texel texture seen at a few
    hundred pixels would otherwise alias)."""
    frames = []
    white = torch.ones(3, device=mesh.v.device)
    with torch.no_grad():
        for az in azimuths:
            camera = Camera.orbit(elevation, float(az), radius, width=size, fovy=fovy)
            out = rasterize_mesh(mesh, camera, background=white, backend=backend,
                                 antialias=True, texture_filter="mipmap")
            frames.append((out.rgb.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    return frames


def write_turntable(frames: list[np.ndarray], path: Path, fps: int = 24) -> Path:
    """MP4 through imageio-ffmpeg; a GIF (same stem) when ffmpeg is unavailable."""
    import imageio.v2 as imageio

    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        with atomic_path(path.with_suffix(".mp4")) as tmp:
            writer = imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264",
                                        quality=7, macro_block_size=8,
                                        ffmpeg_log_level="error")
            for frame in frames:
                writer.append_data(frame)
            writer.close()
        return path.with_suffix(".mp4")
    except (ImportError, RuntimeError, OSError) as exc:
        log.warning("ffmpeg unavailable (%s); writing a GIF turntable instead", exc)
        gif = path.with_suffix(".gif")
        with atomic_path(gif) as tmp:
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=int(1000 / fps), loop=0)
        return gif


def contact_sheet(mesh: Mesh, path: Path, views: int, radius: float, size: int, fovy: float,
                  backend: str = "auto", reference: np.ndarray | None = None) -> Path:
    """A grid PNG: the input (when given) then ``views`` azimuths around the object, labelled."""
    azimuths = np.linspace(0.0, 360.0, views, endpoint=False)
    tiles = render_views(mesh, azimuths, PREVIEW_ELEVATION, radius, size, fovy, backend)
    labels = [f"az {az:.0f}" for az in azimuths]
    if reference is not None:
        ref = Image.fromarray(reference).resize((size, size), Image.LANCZOS)
        tiles = [np.asarray(ref.convert("RGB"))] + tiles
        labels = ["input"] + labels
    cols = 4 if len(tiles) <= 8 else int(np.ceil(len(tiles) / 2))
    rows = int(np.ceil(len(tiles) / cols))
    sheet = Image.new("RGB", (cols * size, rows * size), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x, y = (i % cols) * size, (i // cols) * size
        sheet.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 4, y + 4), label, fill=(60, 60, 60))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
