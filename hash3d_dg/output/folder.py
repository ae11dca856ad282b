"""A run's output folder, written all at once and committed as a whole.

Files are written into a hidden staging folder beside the final one (``<root>/.<name>.tmp-*``).
Only when the whole run succeeds does the staging folder take the final folder's place: on Linux
in one atomic exchange (``renameat2(RENAME_EXCHANGE)``), elsewhere by two renames; the previous
folder is removed afterwards. So ``<root>/<name>/`` always holds one complete result (never a mix
of files of two runs), a failed or interrupted run leaves nothing behind and an earlier result
intact, and of two concurrent runs of one name the one that commits last wins whole: commits of
one root are serialised by an advisory lock on the root folder itself (no lock file is left).
The name is checked first (``names.check_name``); an OS error while committing removes the
staging folder, leaves the earlier result in place and raises ``OutputError`` (one line).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid
from pathlib import Path

from hash3d_dg.errors import OutputError
from hash3d_dg.output.names import check_name

try:
    import fcntl
except ImportError:  # not POSIX: commits are not serialised between processes
    fcntl = None

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (both must exist); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # kernel or file system without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def locked_folder(folder: Path):
    """An exclusive advisory lock (``flock``) on ``folder`` for the block."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


class OutputFolder:
    def __init__(self, root: str | os.PathLike, name: str) -> None:
        self.root = Path(root)
        self.name = check_name(name, root)
        self.final = self.root / name
        self.staging = self.root / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        self.committed = False

    def __enter__(self) -> "OutputFolder":
        try:
            self.staging.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise OutputError(f"cannot create a staging folder in {self.root} ({exc.strerror or exc}): "
                              "pass a writable output folder") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def path(self, filename: str) -> Path:
        """Where to write ``filename`` now (inside the staging folder)."""
        return self.staging / filename

    def final_path(self, filename: str) -> Path:
        """Where ``filename`` will be once the run is committed."""
        return self.final / filename

    def commit(self) -> dict[str, Path]:
        """Put the staged folder in the final folder's place; returns {filename: final path}.

        Any OS error on the way removes the staging folder, leaves the earlier result (if any) at
        the final path and raises ``OutputError`` naming the output folder."""
        old = None
        try:
            with locked_folder(self.root):
                if os.path.lexists(self.final):
                    if exchange(self.staging, self.final):
                        old = self.staging  # now holds the previous result
                    else:
                        old = self.root / f".{self.name}.old-{uuid.uuid4().hex[:8]}"
                        os.rename(self.final, old)
                        try:
                            os.rename(self.staging, self.final)
                        except OSError:
                            self._restore(old)
                            raise
                else:
                    os.rename(self.staging, self.final)
                self.committed = True
                names = sorted(item.name for item in self.final.iterdir())
                if old is not None:
                    _remove(old)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot commit the result to {self.final} ({exc.strerror or exc}): nothing was "
                              "written there; any earlier result is untouched") from None
        return {name: self.final / name for name in names}

    def _restore(self, old: Path) -> None:
        """Put the earlier result moved to ``old`` back at the final path."""
        try:
            os.rename(old, self.final)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot commit the result to {self.final} ({exc.strerror or exc}): the earlier "
                              f"result is kept in {old}") from None

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
