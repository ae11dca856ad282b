"""A run's output folder, written all at once.

Files are written into a hidden staging folder beside the final one; only when the whole run
succeeds are they moved (``os.replace``) into ``<root>/<name>/``. A failed run leaves nothing
behind and an earlier result of the same name intact.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


class OutputFolder:
    def __init__(self, root: str | os.PathLike, name: str) -> None:
        self.root = Path(root)
        self.name = name
        self.final = self.root / name
        self.staging = self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "OutputFolder":
        self.staging.mkdir(parents=True, exist_ok=False)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def path(self, filename: str) -> Path:
        """Where to write ``filename`` now (inside the staging folder)."""
        return self.staging / filename

    def final_path(self, filename: str) -> Path:
        """Where ``filename`` will be once the run is committed."""
        return self.final / filename

    def commit(self) -> dict[str, Path]:
        """Move every staged file into the final folder; returns {filename: final path}."""
        self.final.mkdir(parents=True, exist_ok=True)
        moved = {}
        for item in sorted(self.staging.iterdir()):
            target = self.final / item.name
            os.replace(item, target)
            moved[item.name] = target
        self.staging.rmdir()
        return moved

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
