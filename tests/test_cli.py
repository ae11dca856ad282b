"""The command line as a user meets it: the smoke run end to end, and every kind of bad input
ending with exit status 2, one line on stderr, no traceback and nothing half-written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
import torch
from PIL import Image

from hash3d_dg.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def sample_image() -> Path:
    images = sorted((ROOT / "data").glob("*.png"))
    assert images, "data/ holds the project's sample inputs"
    return images[0]


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, HASH3D_DG_CACHE=str(out / "cache"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "main.py", "--image", str(sample_image()), "--config", SMOKE,
                           "--output", str(out / "logs"), "--name", "sample", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out / "logs" / "sample"


def test_smoke_run_writes_every_output(smoke_run):
    proc, folder = smoke_run
    assert proc.returncode == 0, proc.stderr
    for name in ("sample.glb", "sample.obj", "sample.mtl", "sample_gaussians.ply", "sample_rgba.png",
                 "sample_views.png", "sample_report.json"):
        assert (folder / name).is_file(), name
    assert (folder / "sample_turntable.mp4").is_file() or (folder / "sample_turntable.gif").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "staging left behind"
    assert "hash3d" in proc.stdout and "device" in proc.stdout


def test_smoke_glb_loads_with_its_texture(smoke_run):
    _, folder = smoke_run
    scene = trimesh.load(folder / "sample.glb")
    mesh = next(iter(scene.geometry.values())) if isinstance(scene, trimesh.Scene) else scene
    assert len(mesh.faces) > 0
    texture = mesh.visual.material.baseColorTexture
    assert texture is not None and min(texture.size) >= 8
    assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)


def test_smoke_report_holds_the_documented_fields(smoke_run):
    _, folder = smoke_run
    report = json.loads((folder / "sample_report.json").read_text())
    for key in ("config", "device", "dtype", "backends", "model", "hash3d", "outputs", "total_seconds"):
        assert key in report, key
    assert report["hash3d"]["mode"] == "paper"
    assert report["load"]["seconds"] >= 0  # the guidance model's load and reference
    for stage in ("stage1", "stage2"):
        section = report[stage]
        for key in ("iters", "seconds", "ref_psnr", "ref_mask_iou"):
            assert key in section, (stage, key)
        assert set(section["unet"]) >= {"full_calls", "shallow_calls"}
        assert set(section["cache"]) >= {"attempts", "hits", "inserts", "bytes"}
        assert section["unet"]["shallow_calls"] == section["cache"]["hits"]
        assert section["unet"]["full_calls"] > 0
    for path in report["outputs"].values():
        assert Path(path).is_file(), path


def test_help_documents_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--config", "--output", "--name", "--elevation", "--seed", "--device", "--model",
                   "--iters", "--iters-refine", "--hash3d", "--no-hash3d", "--hash3d-mode", "--eta",
                   "--stage", "--backend-gaussian", "--backend-mesh", "default", "stage1.iters="):
        assert option in text, option


# ---------------------------------------------------------------- bad input


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _bad_inputs(tmp: Path) -> dict:
    good = sample_image()
    empty_dir = tmp / "empty"
    empty_dir.mkdir()
    not_image = tmp / "notes.png"
    not_image.write_text("this is not an image\n")
    truncated = tmp / "truncated.png"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    tiny = _png(tmp / "tiny.png", np.zeros((1, 1, 4), np.uint8))
    transparent = _png(tmp / "clear.png", np.zeros((64, 64, 4), np.uint8))
    return {
        "missing file": ["--image", str(tmp / "nope.png")],
        "directory without images": ["--image", str(empty_dir)],
        "not an image": ["--image", str(not_image)],
        "truncated image": ["--image", str(truncated)],
        "1x1 image": ["--image", str(tiny)],
        "all-transparent alpha": ["--image", str(transparent)],
        "unknown config key": ["--image", str(good), "stage1.bogus=3"],
        "unreachable model": ["--image", str(good), "--model", "no-such-user/no-such-zero123"],
        "missing local model dir": ["--image", str(good), "--model", str(tmp / "no_model_here")],
    }


@pytest.mark.parametrize("case", ["missing file", "directory without images", "not an image",
                                  "truncated image", "1x1 image", "all-transparent alpha",
                                  "unknown config key", "unreachable model", "missing local model dir"])
def test_bad_input_exits_2_with_one_line(case, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    args = _bad_inputs(tmp_path)[case]
    out = tmp_path / "logs"
    earlier = out / "sample"
    earlier.mkdir(parents=True)
    (earlier / "sample.glb").write_bytes(b"an earlier result")
    before = tree(out)
    code = main(args + ["--config", SMOKE, "--output", str(out), "--name", "sample", "--quiet"])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    assert tree(out) == before, "bad input must leave the output folder as it was"


def test_folder_run_continues_past_a_bad_image(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(sample_image().read_bytes())
    (folder / "b_bad.png").write_text("not an image")
    out = tmp_path / "logs"
    code = main(["--image", str(folder), "--config", SMOKE, "--output", str(out), "--quiet",
                 "stage1.iters=1", "stage2.iters=1", "output.save_video=false"])
    captured = capfd.readouterr()
    assert code == 2
    assert (out / "a_good" / "a_good.glb").is_file()
    assert not (out / "b_bad").exists()
    assert "1 succeeded, 1 failed" in captured.out
    # The end-of-folder table: every input with its status and error line.
    table = captured.out[captured.out.index("input  "):].splitlines()
    assert table[0].split() == ["input", "status", "error"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows[str(folder / "a_good.png")].split()[1] == "ok"
    bad_row = rows[str(folder / "b_bad.png")]
    assert bad_row.split()[1] == "failed" and "is not an image" in bad_row


def test_stage_2_reuses_a_stage_1_result(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "logs"
    common = ["--image", str(sample_image()), "--config", SMOKE, "--output", str(out), "--name", "split",
              "--quiet", "output.save_video=false"]
    assert main(common + ["--stage", "1"]) == 0
    folder = out / "split"
    assert (folder / "split_gaussians.ply").is_file() and not (folder / "split.glb").exists()
    report1 = json.loads((folder / "split_report.json").read_text())
    assert "stage1" in report1 and "stage2" not in report1
    ply_before = (folder / "split_gaussians.ply").read_bytes()
    assert main(common + ["--stage", "2"]) == 0
    report2 = json.loads((folder / "split_report.json").read_text())
    assert "stage2" in report2 and "stage1" not in report2
    assert (folder / "split.glb").is_file()
    assert (folder / "split_gaussians.ply").read_bytes() == ply_before


def test_stage_2_without_a_stage_1_result_is_a_clear_error(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    code = main(["--image", str(sample_image()), "--config", SMOKE, "--output", str(tmp_path / "logs"),
                 "--stage", "2", "--quiet"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--stage 1" in err[0]


# ------------------------------------------------------------------ start-up, paths, divergence

HEAVY = ("diffusers", "transformers", "trimesh", "torch._dynamo", "scipy", "pymeshlab", "gsplat",
         "nvdiffrast", "gradio", "ray", "matplotlib")


def test_pipeline_import_loads_no_model_library():
    """Model, mesh and app libraries are imported where they are used, not by the pipeline."""
    script = ("import json, sys\nimport hash3d_dg.pipeline\n"
              f"print(json.dumps([m for m in {HEAVY + ('mcubes', 'xatlas', 'imageio')!r} "
              "if m in sys.modules]))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], proc.stderr


def test_cuda_context_is_prepared_only_on_cuda():
    from hash3d_dg.pipeline import prepare_cuda_context

    assert prepare_cuda_context(torch.device("cpu")) is None


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["--image", "data/ball.png", "stage1.iters=-3"], 2),
    (["--image", "data/ball.png", "--config", "no-such-config"], 2),
    (["--image", "data/ball.png", "--name", "../escape", "--output", "logs/never-made"], 2),
])
def test_help_and_config_errors_import_no_model_library(argv, code):
    script = ("import json, sys\nfrom hash3d_dg.apps.cli import main\n"
              f"try:\n    code = main({argv!r})\nexcept SystemExit as exc:\n    code = exc.code\n"
              f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules]]), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    got_code, loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert got_code == code and loaded == [], proc.stderr
    if code:
        assert len(proc.stderr.strip().splitlines()) == 2  # the error line + our probe's line


def test_override_after_image_is_an_override(tmp_path, capfd):
    code = main(["--image", str(sample_image()), "stage1.iters=-3", "--output", str(tmp_path)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "stage1.iters=-3" in err[0] and ">= 0" in err[0]


def test_invalid_yaml_file_is_one_line(tmp_path, capfd):
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage1:\n  iters: [1, 2\n  ref_size: 3\n")
    code = main(["--image", str(sample_image()), "--config", str(broken), "--output", str(tmp_path / "o")])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not valid YAML" in err[0] and str(broken) in err[0]
    assert not (tmp_path / "o").exists()


def test_output_root_that_cannot_be_created(tmp_path, capfd):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["--image", str(sample_image()), "--config", SMOKE, "--output", str(blocker / "logs")])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "output root" in err[0] and "cannot be created" in err[0]
    code = main(["--image", str(sample_image()), "--config", SMOKE, "--output", str(blocker)])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a folder" in err[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_root_that_cannot_be_written(tmp_path, capfd):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        code = main(["--image", str(sample_image()), "--config", SMOKE, "--output", str(root)])
    finally:
        root.chmod(0o700)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not writable" in err[0]


def test_names_with_spaces_and_non_ascii(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "my phötos 写真"
    folder.mkdir()
    image = folder / "café box ü.png"
    image.write_bytes(sample_image().read_bytes())
    out = tmp_path / "out put ø"
    code = main(["--image", str(image), "--config", SMOKE, "--output", str(out), "--quiet",
                 "mesh.resolution=32", "mesh.decimate_target=1500", "output.turntable_frames=2"])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    result = out / "café box ü"
    names = {p.name for p in result.iterdir()}
    assert {"café box ü.glb", "café box ü_turntable.mp4", "café box ü_report.json"} <= names
    scene = trimesh.load(result / "café box ü.glb")
    assert len(next(iter(scene.geometry.values())).faces) > 0
    assert json.loads((result / "café box ü_report.json").read_text(encoding="utf-8"))["name"] == "café box ü"


def test_diverging_run_stops_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "logs"
    (out / "ball").mkdir(parents=True)
    (out / "ball" / "ball.glb").write_bytes(b"earlier")
    code = main(["--image", str(ROOT / "data" / "ball.png"), "--config", SMOKE, "--output", str(out),
                 "--quiet", "stage1.lambda_rgb=1e39"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "stage 1 diverged at iteration 1: the loss is not finite" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["ball"]
    assert [p.name for p in (out / "ball").iterdir()] == ["ball.glb"]
    assert (out / "ball" / "ball.glb").read_bytes() == b"earlier"


def test_a_setup_error_in_a_folder_marks_the_rest_not_run(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(sample_image().read_bytes())
    code = main(["--image", str(folder), "--config", SMOKE, "--output", str(tmp_path / "logs"), "--quiet",
                 "--model", str(tmp_path / "no_model_here")])
    captured = capfd.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no_model_here" in err[0]
    rows = captured.out[captured.out.index("input  "):].splitlines()[1:]
    assert [row.split()[1] for row in rows] == ["failed", "not"]  # "not run"
    assert "a failed with a setup error" in rows[1]
    assert not (tmp_path / "logs" / "a").exists() and not (tmp_path / "logs" / "b").exists()


# ------------------------------------------------------------------ output names (issue 20)

BAD_NAMES = {"escape": "../escape", "absolute": None, "slash": "a/b", "empty": "", "dot": ".", "dot dot": "..",
             "backslash": "a\\b", "NUL": "a\x00b", "newline": "a\nb", "hidden": ".a", "option": "-x",
             "too long": "x" * 250}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_bad_name_exits_2_before_any_work_and_writes_nothing(case, tmp_path, capfd):
    name = BAD_NAMES[case] if BAD_NAMES[case] is not None else str(tmp_path / "abs")
    out = tmp_path / "logs"
    earlier = out / "sample"
    earlier.mkdir(parents=True)
    (earlier / "sample.glb").write_bytes(b"an earlier result")
    before = tree(tmp_path)
    for root in (out, tmp_path / "fresh"):  # an existing output root, and one not made yet
        code = main(["--image", str(sample_image()), "--config", SMOKE, "--output", str(root), f"--name={name}",
                     "--quiet"])
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("error: --name '") and "cannot be used" in lines[0], err
        assert "(pass another --name)" in lines[0] and "Traceback" not in err
        assert tree(tmp_path) == before, "nothing may be written, beside the output root or in it"


def test_folder_with_two_inputs_of_one_name_is_refused_before_work(tmp_path, capfd):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for fname in ("a.png", "a.jpg", "b.png"):
        (folder / fname).write_bytes(sample_image().read_bytes())
    out = tmp_path / "logs"
    code = main(["--image", str(folder), "--config", SMOKE, "--output", str(out), "--quiet"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "two inputs would write the same output folder 'a'" in err[0]
    assert str(folder / "a.jpg") in err[0] and str(folder / "a.png") in err[0]
    assert not out.exists()


def test_folder_with_an_unusable_file_name_is_refused_naming_the_file(tmp_path, capfd):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for fname in ("-x.png", "ok.png"):
        (folder / fname).write_bytes(sample_image().read_bytes())
    out = tmp_path / "logs"
    code = main(["--image", str(folder), "--config", SMOKE, "--output", str(out), "--quiet"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: input {folder / '-x.png'}: output name '-x' cannot be used: it starts with '-'")
    assert err[0].endswith("(rename the file)")
    assert not out.exists()
