"""Folder runs: every image starts from the same state (empty Hash3D table, freshly seeded
generators), and the output folder is committed as a whole (no mix of two results, concurrent
runs of one name end with one complete result)."""

import json
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest
import trimesh

from hash3d_dg.config import load_config
from hash3d_dg.gaussians import load_ply
from hash3d_dg.output.folder import OutputFolder
from hash3d_dg.pipeline import RunContext, run_image, run_images

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# The smoke config made lighter still where it does not matter here (mesh size, previews).
LIGHT = ["output.save_video=false", "mesh.resolution=32", "mesh.decimate_target=1500",
         "mesh.bake_render_size=64", "output.turntable_frames=2", "output.contact_sheet_views=2",
         "output.preview_size=32"]
A, B = ROOT / "data" / "box.png", ROOT / "data" / "ball.png"


def _numbers(tree, prefix=""):
    """Every number of a report, by dotted key, timings and paths left out."""
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            if "seconds" in key or key in ("outputs", "input", "versions", "config"):
                continue
            out.update(_numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(_numbers(value, f"{prefix}{i}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix.rstrip(".")] = float(tree)
    return out


def _glb_arrays(path: Path) -> dict:
    scene = trimesh.load(path)
    mesh = next(iter(scene.geometry.values())) if isinstance(scene, trimesh.Scene) else scene
    return {"vertices": np.asarray(mesh.vertices), "faces": np.asarray(mesh.faces),
            "uv": np.asarray(mesh.visual.uv),
            "texture": np.asarray(mesh.visual.material.baseColorTexture, dtype=np.float64)}


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    import os

    os.environ.setdefault("HASH3D_DG_CACHE", str(tmp / "cache"))
    cfg = load_config(SMOKE, LIGHT)
    both = run_images([A, B], RunContext.create(cfg, progress=False), tmp / "both")
    alone = run_images([B], RunContext.create(cfg, progress=False), tmp / "alone")
    return tmp, both, alone


def test_second_image_of_a_folder_equals_a_run_of_it_alone(folder_runs):
    tmp, both, alone = folder_runs
    assert [r.status for r in both] == ["ok", "ok"] and alone[0].status == "ok", both + alone
    b_in_folder, b_alone = both[1].report, alone[0].report
    numbers_folder, numbers_alone = _numbers(b_in_folder), _numbers(b_alone)
    assert numbers_folder.keys() == numbers_alone.keys()
    assert numbers_folder["unet_total.full_calls"] > 0  # the guidance really ran
    for key in numbers_folder:
        assert numbers_folder[key] == pytest.approx(numbers_alone[key], rel=1e-6, abs=1e-6), key
    # The saved report says the same as the returned one.
    saved = json.loads((tmp / "both" / "ball" / "ball_report.json").read_text())
    assert _numbers(saved) == numbers_folder

    ply_folder = load_ply(tmp / "both" / "ball" / "ball_gaussians.ply")
    ply_alone = load_ply(tmp / "alone" / "ball" / "ball_gaussians.ply")
    for name in ("means", "sh0", "opacities", "scales", "quats"):
        a, b = ply_folder.params[name].detach().numpy(), ply_alone.params[name].detach().numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
    glb_folder = _glb_arrays(tmp / "both" / "ball" / "ball.glb")
    glb_alone = _glb_arrays(tmp / "alone" / "ball" / "ball.glb")
    for name in glb_folder:
        np.testing.assert_allclose(glb_folder[name], glb_alone[name], rtol=0, atol=1e-6, err_msg=name)


def test_each_image_starts_with_an_empty_table(folder_runs):
    _, both, alone = folder_runs
    s1_first, s1_second = both[0].report["stage1"]["cache"], both[1].report["stage1"]["cache"]
    # Entries at the end of stage 1 are the image's own inserts (minus evictions), never the
    # previous image's.
    assert s1_second["entries"] == s1_second["inserts"] - s1_second["evictions"]
    assert s1_first["entries"] == s1_first["inserts"] - s1_first["evictions"]


def test_a_rerun_replaces_the_whole_folder(tmp_path, monkeypatch):
    """An earlier result's files that this run does not write must not stay mixed in."""
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "logs"
    earlier = out / "ball"
    earlier.mkdir(parents=True)
    (earlier / "ball.glb").write_bytes(b"an earlier result")
    (earlier / "notes.txt").write_text("a file of an earlier run")
    cfg = load_config(SMOKE, ["stage1.iters=1"] + LIGHT)
    run_image(B, RunContext.create(cfg, progress=False), out, stage="1")
    names = sorted(p.name for p in earlier.iterdir())
    assert names == ["ball_gaussians.ply", "ball_report.json", "ball_rgba.png"]
    assert sorted(p.name for p in out.iterdir()) == ["ball"]  # no staging or old folder left


def _commit_many(root: str, writer: int, rounds: int, barrier) -> None:
    barrier.wait()
    for r in range(rounds):
        with OutputFolder(root, "same") as out:
            for k in range(5 + (writer + r) % 3):  # results differ in their file lists too
                out.path(f"file{k}.txt").write_text(f"{writer}:{r}")
            out.commit()


def test_concurrent_commits_of_one_name_end_with_one_complete_result(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_commit_many, args=(str(tmp_path), w, 40, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    final = tmp_path / "same"
    tags = {p.read_text() for p in final.iterdir()}
    assert len(tags) == 1, f"files of several results mixed: {tags}"
    writer, r = map(int, tags.pop().split(":"))
    assert sorted(p.name for p in final.iterdir()) == [f"file{k}.txt" for k in range(5 + (writer + r) % 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]


def test_two_concurrent_runs_of_one_name(tmp_path, monkeypatch):
    """Two real runs (threads, each with its own context) writing the same name at once."""
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "logs"
    cfg = load_config(SMOKE, ["stage1.iters=1"])
    contexts = [RunContext.create(cfg, progress=False) for _ in range(2)]
    for ctx in contexts:
        ctx.guidance()  # load the model before the race
    reports, errors = [None, None], []

    def run(i, image):
        try:
            reports[i] = run_image(image, contexts[i], out, name="same", stage="1")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, img)) for i, img in enumerate((A, B))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    saved = json.loads((out / "same" / "same_report.json").read_text())
    winner = next(r for r in reports if r["input"] == saved["input"])
    assert _numbers(saved) == _numbers(winner)
    assert sorted(p.name for p in (out / "same").iterdir()) == sorted(winner["outputs"])
    assert sorted(p.name for p in out.iterdir()) == ["same"]
