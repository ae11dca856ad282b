"""Write output files atomically: a reader sees the old file or the complete new one, never half.

Each helper writes to a hidden temporary file in the destination folder (same file system, same
suffix so format-by-extension writers keep working) and moves it into place with ``os.replace``
only when writing succeeded. On failure the temporary file is removed and an existing file at
the destination is left untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _default_file_mode() -> int:
    """Mode a newly created file would get (0o666 minus the process umask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block succeeds.

    The temporary file is ``<folder>/.<name>.tmp-<random><suffix>`` and exists (empty) when the
    block starts. The parent folder is created if needed. If the block raises, the temporary file
    is deleted, ``path`` is not touched, and the exception propagates. The final file gets the
    permissions a plain ``open(path, "w")`` would give (a new file) or keeps those of the file it
    replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = _default_file_mode()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically; return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=indent, ensure_ascii=False)
            handle.write("\n")
    return path


def to_pil_image(image: np.ndarray | Image.Image) -> Image.Image:
    """Convert an image array to a PIL image (8-bit); PIL images pass through.

    ``image``: [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; float values are taken in [0, 1]
    (clipped, rounded to 8 bit), bool as 0/255, uint8 as is, uint16 grey as a 16-bit image.
    """
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"expected an image of shape [H,W], [H,W,1], [H,W,3] or [H,W,4], got {array.shape}")
    if array.dtype == np.uint16 and array.ndim == 2:
        return Image.fromarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {array.dtype}: use float in [0, 1] or uint8")
    return Image.fromarray(np.ascontiguousarray(array))


def save_image_atomic(path: str | os.PathLike[str], image: np.ndarray | Image.Image, **save_kwargs: Any) -> Path:
    """Save an image array or PIL image to ``path`` atomically (format from the suffix).

    ``image``: see :func:`to_pil_image` (float arrays in [0, 1] become 8-bit). Extra keyword
    arguments go to ``PIL.Image.Image.save``. Returns the path.
    """
    path = Path(path)
    pil = to_pil_image(image)
    with atomic_path(path) as tmp:
        pil.save(tmp, **save_kwargs)
    return path
