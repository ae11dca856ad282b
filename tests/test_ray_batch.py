"""Batch runs on a local Ray instance: ``main.py --image DIR --ray --ray-workers 2``.

Two CPU workers, the smoke config, three images of which one is not an image. A worker is killed
(SIGKILL, a real crash of its process) while it holds an image, to check the retry on another
worker; the rerun skips the finished images, and an image whose worker dies on both attempts is
reported failed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from hash3d_dg.apps import cli
from hash3d_dg.apps.ray_batch import REPORT_NAME, complete_report

REPO = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"^\[(?P<name>[^\]]+)\] started on (?P<worker>\S+) \(pid (?P<pid>\d+), attempt (?P<attempt>\d+)\)")


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2,
             logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


class Killer(logging.Handler):
    """Kills a worker process (SIGKILL) as soon as the driver hands it a chosen (image, attempt)."""

    def __init__(self, plan: set[tuple[str, int]]) -> None:
        super().__init__()
        self.plan, self.killed, self.lines = plan, [], []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(message)
        m = STARTED.match(message)
        if m and (m["name"], int(m["attempt"])) in self.plan:
            os.kill(int(m["pid"]), signal.SIGKILL)
            self.killed.append((m["name"], m["worker"]))


def run_batch(images: Path, output: Path, kill: set[tuple[str, int]]) -> tuple[int, Killer]:
    killer = Killer(kill)
    logger = logging.getLogger("hash3d_dg.batch")
    logger.addHandler(killer)
    try:
        rc = cli.main(["--image", str(images), "--config", "configs/smoke.yaml", "--output", str(output),
                       "--ray", "--ray-workers", "2"])
    finally:
        logger.removeHandler(killer)
    return rc, killer


def cli_error_line(image: Path, tmp: Path, capsys) -> str:
    """What the plain CLI prints for ``image``."""
    capsys.readouterr()
    assert cli.main(["--image", str(image), "--config", "configs/smoke.yaml", "--output", str(tmp), "--quiet"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    return lines[0]


def assert_glb(path: Path) -> None:
    data = path.read_bytes()
    assert data[:4] == b"glTF" and int.from_bytes(data[4:8], "little") == 2
    assert int.from_bytes(data[8:12], "little") == len(data)


@pytest.fixture(scope="module")
def first_run(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    images = root / "images"
    images.mkdir()
    for name in ("ball.png", "box.png"):
        shutil.copy(REPO / "data" / name, images / name)
    (images / "bad.png").write_text("this is a text file, not a PNG\n")
    output = root / "out"
    rc, killer = run_batch(images, output, kill={("ball", 1)})
    report = json.loads((output / REPORT_NAME).read_text())
    return {"root": root, "images": images, "output": output, "rc": rc, "killer": killer, "report": report}


def test_three_images_two_results_one_failure(first_run, tmp_path, capsys):
    output, report = first_run["output"], first_run["report"]
    assert first_run["rc"] == 2  # as the CLI: any failed image -> exit 2
    rows = {row["name"]: row for row in report["images"]}
    assert [row["name"] for row in report["images"]] == ["bad", "ball", "box"]
    assert report["counts"] == {"done": 2, "failed": 1, "skipped": 0}
    assert "2 succeeded, 1 failed, 0 skipped" in report["summary"]
    assert report["summary"] == first_run["killer"].lines[-2]  # logged as the summary line

    # The bad image: the plain CLI's one-line error, and no folder of its own.
    assert rows["bad"]["status"] == "failed"
    assert rows["bad"]["error"] == cli_error_line(first_run["images"] / "bad.png", tmp_path, capsys)
    assert not (output / "bad").exists()
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")]  # no staging left

    for name in ("ball", "box"):
        row = rows[name]
        assert row["status"] == "done" and row["error"] is None and row["worker"]
        assert set(row["seconds"]) >= {"preprocess", "stage1", "mesh", "stage2", "export", "total"}
        assert all(v >= 0 for v in row["seconds"].values())
        own = json.loads((output / name / f"{name}_report.json").read_text())
        assert row["hit_rate"] == own["unet_total"]["hit_rate"]
        assert row["seconds"]["total"] == own["total_seconds"]
        assert_glb(output / name / f"{name}.glb")
        assert complete_report(output, name, "all") is not None

    # The worker killed while holding 'ball': retried once, on another worker, and finished.
    assert first_run["killer"].killed and first_run["killer"].killed[0][0] == "ball"
    killed_worker = first_run["killer"].killed[0][1]
    assert rows["ball"]["attempts"] == 2 and rows["ball"]["worker"] != killed_worker
    assert rows["box"]["attempts"] == 1


def test_complete_result_needs_every_listed_file(first_run, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(first_run["output"] / "box", copy / "box")
    assert complete_report(copy, "box", "all") is not None
    assert complete_report(copy, "box", "1") is None  # a stage-1 rerun is not this result
    (copy / "box" / "box_views.png").unlink()
    assert complete_report(copy, "box", "all") is None


def test_rerun_skips_done_images_and_fails_an_image_whose_worker_dies_twice(first_run):
    output = first_run["output"]
    glb_mtime = {n: (output / n / f"{n}.glb").stat().st_mtime_ns for n in ("ball", "box")}
    rc, killer = run_batch(first_run["images"], output, kill={("bad", 1), ("bad", 2)})
    assert rc == 2
    report = json.loads((output / REPORT_NAME).read_text())
    rows = {row["name"]: row for row in report["images"]}
    assert report["counts"] == {"done": 0, "failed": 1, "skipped": 2}
    for name in ("ball", "box"):
        assert rows[name]["status"] == "skipped" and rows[name]["worker"] is None
        assert any(line.startswith(f"[{name}] skipped") for line in killer.lines)
        assert (output / name / f"{name}.glb").stat().st_mtime_ns == glb_mtime[name]  # not rerun
        assert rows[name]["seconds"]["total"] > 0  # read back from the existing report
    bad = rows["bad"]
    assert [k[0] for k in killer.killed] == ["bad", "bad"] and killer.killed[0][1] != killer.killed[1][1]
    assert bad["status"] == "failed" and bad["attempts"] == 2
    assert bad["error"].startswith("error: the worker died on") and "\n" not in bad["error"]


@pytest.mark.parametrize("files, expected", [
    (("ball.png", "ball.jpg"), "two inputs would write the same output folder 'ball'"),
    (("ball.png", "-x.png"), "output name '-x' cannot be used: it starts with '-'"),
    (("batch_report.json.png",), "it is the name of a file this run writes in the output root"),
])
def test_unusable_or_shared_names_are_refused_before_ray_starts(files, expected, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for fname in files:
        shutil.copy(REPO / "data" / "ball.png", images / fname)
    output = tmp_path / "out"
    rc = cli.main(["--image", str(images), "--config", "configs/smoke.yaml", "--output", str(output),
                   "--ray", "--ray-workers", "2"])
    # lines a still-running Ray worker of an earlier test forwards ("(Worker pid=...) ...") are
    # not this run's output
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "pid=" not in line[:40]]
    assert rc == 2 and len(err) == 1 and expected in err[0], err
    assert not output.exists()


class _FakeRay:
    """Just enough of Ray for the pool's actor options."""

    def __init__(self):
        self.options = None

    def remote(self, cls):
        fake = self

        class Remote:
            def options(self, **kwargs):
                fake.options = kwargs
                return self

            def remote(self, *args):
                class Actor:
                    class info:
                        @staticmethod
                        def remote():
                            return object()
                return Actor()
        return Remote()


@pytest.mark.parametrize("use_gpu, per_gpu, expected", [(True, 0.25, 0.25), (True, 1.0, 1.0),
                                                        (False, 0.25, 0)])
def test_workers_reserve_a_fraction_of_a_gpu(use_gpu, per_gpu, expected):
    from hash3d_dg.apps.ray_batch import _Pool

    ray = _FakeRay()
    pool = _Pool(ray, 4, use_gpu, (), per_gpu)
    assert ray.options["num_gpus"] == expected and len(pool.starting) == 4


def test_gpus_per_worker_must_be_a_fraction_or_whole(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    code = cli.main(["--image", str(tmp_path / "in"), "--ray", "--ray-gpus-per-worker", "1.5",
                     "--output", str(tmp_path / "out"), "--config", str(REPO / "configs/smoke.yaml")])
    assert code != 0 and "--ray-gpus-per-worker" in capsys.readouterr().err


def test_prompts_file_on_ray(local_ray, tmp_path):
    """Text to 3D on Ray: a prompts file, the same run_image per prompt, slugs as names."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a ceramic mug\na red apple\n", encoding="utf-8")
    output = tmp_path / "out"
    rc = cli.main(["--prompts", str(prompts), "--config", "configs/text_smoke.yaml", "--output", str(output),
                   "--negative-prompt", "blurry", "--ray", "--ray-workers", "1",
                   "stage1.iters=1", "stage2.iters=1", "mesh.resolution=32", "output.save_video=false"])
    assert rc == 0
    report = json.loads((output / REPORT_NAME).read_text())
    rows = {row["name"]: row for row in report["images"]}
    assert set(rows) == {"a-ceramic-mug", "a-red-apple"} and report["counts"]["done"] == 2
    assert rows["a-red-apple"]["prompt"] == "a red apple"
    own = json.loads((output / "a-red-apple" / "a-red-apple_report.json").read_text())
    assert own["prompt"] == "a red apple" and own["negative_prompt"] == "blurry"
    assert_glb(output / "a-ceramic-mug" / "a-ceramic-mug.glb")
