"""Stopping a run: SIGINT (Ctrl-C) and SIGTERM, sent to a real ``main.py`` subprocess at several
points (loading, stage 1, xatlas's child process, a folder's second image in stage 2), end it
with exit 130 / 143 and one line on stderr, remove the staging folder and every child process,
leave an earlier result untouched, and keep the images of a folder that were already finished.

The runs start together (each waits for its own moment) so the suite pays one start-up.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
BALL, BOX = ROOT / "data" / "ball.png", ROOT / "data" / "box.png"
LIGHT = ["output.save_video=false", "mesh.resolution=32", "mesh.decimate_target=1500",
         "mesh.bake_render_size=64", "output.turntable_frames=2", "output.contact_sheet_views=2",
         "output.preview_size=32"]


def _restore_sigint():
    # A background job of a non-interactive shell inherits SIGINT ignored, and Python then
    # installs no handler for it; a user's Ctrl-C arrives with the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _xatlas_child(pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and b"xatlas" in cmdline:
            return int(entry.name)
    return None


class Run:
    """A ``main.py`` subprocess in its own process group, its stdout read line by line."""

    def __init__(self, tmp: Path, images: list[Path], overrides: list[str], name: str | None = None):
        self.out = tmp / "logs"
        args = [sys.executable, "main.py", "--image", *map(str, images), "--config", SMOKE,
                "--output", str(self.out), "--quiet", *(["--name", name] if name else []),
                *LIGHT, *overrides]
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     preexec_fn=_restore_sigint)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_line(self, pattern: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in self.lines):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended ({self.proc.returncode}) before '{pattern}': "
                                     f"{''.join(self.lines)}{self.proc.stderr.read()}")
            time.sleep(0.05)
        raise AssertionError(f"no line '{pattern}' within {timeout}s")

    def finish(self, timeout: float = 120) -> tuple[int, list[str]]:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        err = self.proc.stderr.read().strip().splitlines()
        return code, err


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _earlier_result(out: Path, name: str) -> dict:
    folder = out / name
    folder.mkdir(parents=True)
    (folder / f"{name}.glb").write_bytes(b"an earlier, complete result")
    (folder / f"{name}_report.json").write_text("{}\n")
    return _tree(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every run, deliver each signal at its moment, collect the outcomes."""
    base = tmp_path_factory.mktemp("signals")
    cache = base / "model-cache"
    os.environ["HASH3D_DG_CACHE"] = str(cache)
    from hash3d_dg.pipeline import tiny_model_dir

    tiny_model_dir("stable")  # written once, before the runs race for it

    plans = {
        # name: (images, overrides, wait for, signal, whole group?)
        "loading": ([BALL], [], r"\[ball\] preprocess", signal.SIGINT, False),
        "stage1": ([BALL], ["stage1.iters=5000"], r"\[ball\] stage 1", signal.SIGTERM, False),
        "xatlas": ([BALL], ["mesh.decimate_target=5000", "mesh.resolution=48"], "xatlas-child",
                   signal.SIGINT, True),
        # The second image's stage 2 (and export right after it): the first image is finished.
        "folder": ([BOX, BALL], [], r"\[ball\] stage 2", signal.SIGTERM, False),
    }
    started, outcomes = {}, {}
    for key, (images, overrides, _, _, _) in plans.items():
        tmp = base / key
        tmp.mkdir()
        earlier = _earlier_result(tmp / "logs", "ball")
        started[key] = (Run(tmp, images, overrides), earlier)
    def deliver(key, pattern, signum, group):
        run, earlier = started[key]
        child = None
        try:
            if pattern == "xatlas-child":
                deadline = time.monotonic() + 240
                while child is None and time.monotonic() < deadline and run.proc.poll() is None:
                    child = _xatlas_child(run.proc.pid)
                    time.sleep(0.005)
                assert child is not None, "the xatlas child process was never seen"
            else:
                run.wait_for_line(pattern)
            if group:
                os.killpg(run.proc.pid, signum)  # what Ctrl-C in a terminal does
            else:
                os.kill(run.proc.pid, signum)
        except AssertionError as exc:
            run.proc.kill()
            outcomes[key] = {"setup": str(exc)}
            return
        code, err = run.finish()
        time.sleep(0.2)
        outcomes[key] = {"code": code, "err": err, "out": run.out, "earlier": earlier,
                         "signum": signum, "child": child, "left": _group_members(run.proc.pid)}

    threads = [threading.Thread(target=deliver, args=(key, pattern, signum, group))
               for key, (_, _, pattern, signum, group) in plans.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    for run, _ in started.values():  # never leave a run behind (they live in their own sessions)
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
    return outcomes


@pytest.mark.parametrize("point", ["loading", "stage1", "xatlas", "folder"])
def test_a_signal_ends_the_run_cleanly(runs, point):
    r = runs[point]
    assert "setup" not in r, r.get("setup")
    expected = 130 if r["signum"] == signal.SIGINT else 143
    assert r["code"] == expected, r["err"]
    assert len(r["err"]) == 1, r["err"]
    assert r["err"][0].startswith("error: interrupted by SIG"), r["err"]
    assert "Traceback" not in r["err"][0]
    hidden = [p.name for p in r["out"].iterdir() if p.name.startswith(".")]
    assert not hidden, f"staging left behind: {hidden}"
    assert _tree(r["out"] / "ball") == r["earlier"], "the earlier result was changed"
    assert not r["left"], f"processes of the run still alive: {r['left']}"


def test_the_xatlas_child_is_gone(runs):
    child = runs["xatlas"]["child"]
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_a_folder_run_keeps_its_finished_images(runs):
    r = runs["folder"]
    box = r["out"] / "box"
    assert {"box.glb", "box_report.json", "box_gaussians.ply"} <= {p.name for p in box.iterdir()}
    assert "box" in r["err"][0] and "kept" in r["err"][0]
