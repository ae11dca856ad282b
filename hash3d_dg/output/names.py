"""Output names: what the folder of a result under the output root may be called.

A run of name ``N`` writes ``<root>/N/N<suffix>`` (``N.glb``, ``N_gaussians.ply``, ...) through a
hidden staging folder ``<root>/.N.tmp-xxxxxxxx`` (and, where folders cannot be exchanged
atomically, ``<root>/.N.old-xxxxxxxx``); each file is first written as a hidden temporary beside
it (``.N_gaussians.ply.tmp-XXXXXXXX.ply``). A name is usable when it is one folder name that stays
inside the root and each of those names fits the root's file system:

- not empty, not ``.`` or ``..``; no ``/`` or ``\\`` (a path separator here or on Windows);
- no control character, line break or undecodable byte (the name goes into one-line messages
  and the UTF-8 report);
- not starting with ``.`` (hidden; kept for the staging folders), ``-`` (it would read as an
  option in a shell command) or a space, not ending with a space;
- at most ``NAME_MAX - OVERHEAD`` bytes in the file system's encoding (255 - 32 = 223 on most
  Linux file systems).

Every entry point (the CLI, folder runs, the web app, the Ray runner, ``OutputFolder`` itself)
checks its names here before any model is loaded or any work is done. Standard library only.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from hash3d_dg.errors import ConfigError

# Files a run writes in its folder (pipeline.run_image, mesh.export, previews, app.zip_obj).
FILE_SUFFIXES = (".glb", ".obj", ".mtl", "_albedo.png", "_gaussians.ply", "_rgba.png", "_turntable.mp4",
                 "_turntable.gif", "_views.png", "_report.json", "_obj.zip")
_RANDOM = "x" * 8  # the random part of a staging or temporary name (uuid hex[:8], mkstemp's 8)
DEFAULT_NAME_MAX = 255
SLUG_MAX = 64


def derived_names(name: str) -> list[str]:
    """Every folder or file name a run of ``name`` creates, in the root or in its folder."""
    out = [name, f".{name}.tmp-{_RANDOM}", f".{name}.old-{_RANDOM}"]  # outputs.OutputFolder
    for suffix in FILE_SUFFIXES:
        file = name + suffix
        ext = os.path.splitext(file)[1]
        out += [file, f".{file}.tmp-{_RANDOM}{ext}",  # atomic.atomic_path
                f".{file}.{_RANDOM}.tmp"]  # mesh.export._atomic_write
    return out


# Bytes the longest derived name adds to the name itself (32: ".N_gaussians.ply.tmp-XXXXXXXX.ply").
OVERHEAD = max(len(n) for n in derived_names(""))


def name_max(root: str | os.PathLike | None = None) -> int:
    """The longest file name (bytes) of the file system that holds ``root`` (or would: the
    nearest existing folder above it is asked); 255 where the system does not say."""
    if root is not None and hasattr(os, "pathconf"):
        path = Path(os.path.abspath(root))
        for folder in (path, *path.parents):
            try:
                if folder.is_dir():
                    return int(os.pathconf(folder, "PC_NAME_MAX"))
            except (OSError, ValueError):
                break
    return DEFAULT_NAME_MAX


def max_name_bytes(root: str | os.PathLike | None = None) -> int:
    """The longest output name (bytes) that fits under ``root`` with its files and staging folder."""
    return name_max(root) - OVERHEAD


def name_problem(name: object, root: str | os.PathLike | None = None, reserved: tuple[str, ...] = ()) -> str | None:
    """What makes ``name`` unusable as an output name under ``root`` (one phrase), or None."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not text"
    if name == "":
        return "it is empty"
    if name in (".", ".."):
        return f"'{name}' names a folder itself, not a result's folder"
    for sep in ("/", "\\"):
        if sep in name:
            return f"it contains '{sep}' (a path separator: a name is one folder, not a path)"
    for char in name:
        category = unicodedata.category(char)
        if category in ("Cc", "Zl", "Zp"):
            return f"it contains the control character U+{ord(char):04X}"
        if category == "Cs":
            return "it contains bytes that are not valid text (an undecodable file name)"
    if name[0] == ".":
        return "it starts with '.' (hidden; such names are kept for staging folders)"
    if name[0] == "-":
        return "it starts with '-' (it would read as an option)"
    if name != name.strip():
        return "it starts or ends with white space"
    if name in reserved:
        return "it is the name of a file this run writes in the output root"
    try:
        size = len(os.fsencode(name))
    except UnicodeError:
        return "it cannot be encoded in the file system's encoding"
    limit = max_name_bytes(root)
    if size > limit:
        return (f"it is {size} bytes long and at most {limit} fit (the file system's {limit + OVERHEAD}-byte "
                f"limit on file names, less {OVERHEAD} for the longest file and staging name)")
    return None


def allowed(root: str | os.PathLike | None = None) -> str:
    """What an output name may be, in a few words."""
    return (f"a name is one folder name of at most {max_name_bytes(root)} bytes, without '/', '\\' or control "
            "characters, not starting with '.', '-' or a space")


def show(name: object, limit: int = 60) -> str:
    """``name`` quoted for a one-line message: control characters escaped, long names cut."""
    if not isinstance(name, str):
        return repr(name)
    text = "".join(c if unicodedata.category(c) not in ("Cc", "Zl", "Zp", "Cs") else ascii(c)[1:-1] for c in name)
    return f"'{text[:limit]}...'" if len(text) > limit else f"'{text}'"


def check_name(name: str, root: str | os.PathLike | None = None, what: str = "output name",
               fix: str = "choose another name", reserved: tuple[str, ...] = ()) -> str:
    """``name`` if it is usable as an output name under ``root``; else ``ConfigError`` (one line
    naming it, what is wrong and what is allowed)."""
    problem = name_problem(name, root, reserved)
    if problem:
        raise ConfigError(f"{what} {show(name)} cannot be used: {problem}; {allowed(root)} ({fix})")
    return name


def image_name(image: str | os.PathLike) -> str:
    """Output name of an input: its file stem without a trailing ``_rgba``."""
    stem = Path(image).stem
    return stem.removesuffix("_rgba") or stem


def output_names(images: list, root: str | os.PathLike | None = None, reserved: tuple[str, ...] = ()) -> list[str]:
    """The output name of each input (``image_name``), all checked before any work: each usable
    under ``root``, and no two different files sharing one (``ConfigError`` otherwise). Prompts
    (``prompts.TextPrompt``: anything with a ``slug``) are named by their slugs, repeats
    numbered (``numbered``)."""
    if images and all(hasattr(item, "slug") for item in images):
        names = numbered([item.slug for item in images])
        for prompt, name in zip(images, names):
            check_name(name, root, what=f"{prompt}: output name", fix="pass --name", reserved=reserved)
        return names
    names: list[str] = []
    seen: dict[str, Path] = {}
    for image in images:
        name = image_name(image)
        check_name(name, root, what=f"input {image}: output name", fix="rename the file", reserved=reserved)
        if name in seen and os.path.realpath(seen[name]) != os.path.realpath(image):
            raise ConfigError(f"two inputs would write the same output folder {show(name)}: {seen[name]} and "
                              f"{image} (rename one, or run them one at a time)")
        seen.setdefault(name, Path(image))
        names.append(name)
    return names


def slugify(text: str, fallback: str = "prompt", max_length: int = SLUG_MAX) -> str:
    """An output name made of ``text`` (a prompt, a file name): its words in lowercase ASCII
    joined by '-' (accents dropped), cut at a word boundary to at most ``max_length`` characters;
    ``fallback`` when no ASCII letter or digit is left. Always passes ``check_name``."""
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_length:
            slug = slug or word[:max_length]  # a first word longer than the limit is cut
            break
        slug = candidate
    return slug or fallback


def numbered(names: list[str]) -> list[str]:
    """``names`` with a later repeat of a name numbered ``-2``, ``-3``, ... (the same prompt
    twice is run twice, into two folders)."""
    out: list[str] = []
    used: set[str] = set()
    for base in names:
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        out.append(name)
    return out
