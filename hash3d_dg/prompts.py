"""Text inputs: one prompt (``--prompt``) or a file of prompts, one per line (``--prompts``).

A ``TextPrompt`` is the text-to-3D counterpart of an image path: ``pipeline.run_image`` takes
either, and so do folder runs, the web app and the Ray runner. Its output name is a slug of the
prompt (``names.slugify``), never a path. Standard library only.

Bad input, one line each and before any work: an empty or whitespace-only prompt; a prompts
file that is missing, not UTF-8, empty, or has a blank line (its line number is named).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hash3d_dg.errors import InputError
from hash3d_dg.output.names import numbered, slugify


def clean_prompt(text: object, what: str = "prompt") -> str:
    """The prompt with its white space folded; an ``InputError`` (one line) when it is empty
    or holds control characters."""
    if text is None or not str(text).strip():
        raise InputError(f"the {what} is empty: pass some words, e.g. --prompt \"a ceramic mug with a blue glaze\"")
    folded = " ".join(str(text).split())
    bad = next((c for c in folded if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise InputError(f"the {what} holds the control character U+{ord(bad):04X}: pass plain text")
    return folded


@dataclass(frozen=True)
class TextPrompt:
    """A text input: the prompt (white space folded), and where it came from (for messages)."""

    text: str
    source: str = "--prompt"

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", clean_prompt(self.text))

    @property
    def slug(self) -> str:
        return slugify(self.text)

    def __str__(self) -> str:
        shown = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"prompt '{shown}'"


def read_prompts(path: str | Path) -> list[TextPrompt]:
    """The prompts of a text file, one per line (UTF-8; a final newline is fine).

    Raises:
        InputError: a missing or unreadable file, bytes that are not UTF-8 (the line is named),
            no prompt at all, or a blank line (its number is named).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"prompts file {path} does not exist: pass a text file with one prompt per line") from None
    except IsADirectoryError:
        raise InputError(f"prompts file {path} is a folder: pass a text file with one prompt per line") from None
    except OSError as exc:
        raise InputError(f"prompts file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(f"prompts file {path} is not UTF-8 text (line {line}, byte offset {exc.start}): "
                         "save it as UTF-8") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise InputError(f"prompts file {path} holds no prompt: write one prompt per line")
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"prompts file {path} line {number} is blank: write one prompt per line, "
                             "without blank lines")
        try:
            prompts.append(TextPrompt(line, source=f"{path}:{number}"))
        except InputError as exc:
            raise InputError(f"prompts file {path} line {number}: {exc}") from None
    return prompts


def prompt_names(prompts: list[TextPrompt]) -> list[str]:
    """Output names of prompts: each one's slug, a later prompt with the same slug gets
    ``-2``, ``-3``, ... (the same prompt twice is run twice)."""
    return numbered([prompt.slug for prompt in prompts])
