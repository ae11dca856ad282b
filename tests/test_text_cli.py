"""Text to 3D from the command line: the text smoke run end to end (tiny random Stable Diffusion
on CPU), prompts files, and every bad text input ending with one line and nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

from hash3d_dg.apps.cli import main
from hash3d_dg.prompts import TextPrompt, prompt_names, read_prompts

ROOT = Path(__file__).resolve().parents[1]
TEXT_SMOKE = str(ROOT / "configs" / "text_smoke.yaml")
PROMPT = "a ceramic mug with a blue glaze"
SLUG = "a-ceramic-mug-with-a-blue-glaze"
FAST = ["stage1.iters=1", "stage2.iters=1", "mesh.resolution=32", "output.save_video=false"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    env = dict(os.environ, HASH3D_DG_CACHE=str(out / "cache"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "main.py", "--prompt", PROMPT, "--negative-prompt", "blurry",
                           "--config", TEXT_SMOKE, "--output", str(out / "logs"), "--hash3d-mode", "paper",
                           "--seed", "3", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, out / "logs" / SLUG


def test_text_smoke_run_writes_the_image_runs_outputs(text_run):
    proc, folder = text_run
    assert proc.returncode == 0, proc.stderr
    for suffix in (".glb", ".obj", ".mtl", "_albedo.png", "_gaussians.ply", "_views.png", "_report.json"):
        assert (folder / f"{SLUG}{suffix}").is_file(), suffix
    assert (folder / f"{SLUG}_turntable.mp4").is_file() or (folder / f"{SLUG}_turntable.gif").is_file()
    assert not (folder / f"{SLUG}_rgba.png").exists()  # no input image
    scene = trimesh.load(folder / f"{SLUG}.glb")
    mesh = next(iter(scene.geometry.values())) if isinstance(scene, trimesh.Scene) else scene
    assert len(mesh.faces) > 0 and mesh.visual.material.baseColorTexture is not None
    assert f"prompt '{PROMPT}'" in proc.stdout and "UNet full" in proc.stdout


def test_text_report_holds_prompt_mode_and_cache(text_run):
    _, folder = text_run
    report = json.loads((folder / f"{SLUG}_report.json").read_text())
    assert report["prompt"] == PROMPT and report["negative_prompt"] == "blurry" and report["input"] == "prompt"
    assert report["prompt_truncated"] is False
    assert report["hash3d"]["mode"] == "paper" and report["config"]["seed"] == 3
    assert report["config"]["guidance"]["type"] == "sd" and report["model_family"] == "sd2"
    for stage in ("stage1", "stage2"):
        section = report[stage]
        assert "ref_psnr" not in section  # no reference view
        assert section["unet"]["full_calls"] > 0
        assert section["unet"]["shallow_calls"] == section["cache"]["hits"]
    assert report["unet_total"]["full_calls"] + report["unet_total"]["shallow_calls"] > 0


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, words", [
    (["--prompt", ""], "empty"),
    (["--prompt", "   \t "], "empty"),
    (["--prompt", "a mug", "--image", "data/ball.png"], "either --image"),
    (["--image", "data/ball.png", "--negative-prompt", "x"], "--negative-prompt goes with"),
    (["--prompt", "a mug", "--prompts", "p.txt"], "not both"),
    ([], "pass --image PATH"),
    (["--prompt", "a mug", "--config", "image.yaml", "stage1.iters=1"], "--config text.yaml"),
    (["--image", "data/ball.png", "--config", "text_smoke.yaml"], "pass --prompt"),
])
def test_bad_text_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "logs"
    code, _, err = _run(argv + ["--output", str(out), "--quiet"], capsys)
    assert code == 2
    assert words in _one_error_line(err)
    assert not out.exists() or not any(out.iterdir())


def test_prompts_file_problems_are_one_line_each(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "logs"
    cases = {
        "blank.txt": (b"a mug\n\na vase\n", "line 2 is blank"),
        "latin1.txt": (b"a mug\nun caf\xe9 cr\xe8me\n", "not UTF-8 text (line 2"),
        "empty.txt": (b"\n  \n", "holds no prompt"),
    }
    for fname, (data, words) in cases.items():
        path = tmp_path / fname
        path.write_bytes(data)
        code, _, err = _run(["--prompts", str(path), "--config", TEXT_SMOKE, "--output", str(out), "--quiet"], capsys)
        assert code == 2 and words in _one_error_line(err), (fname, err)
    code, _, err = _run(["--prompts", str(tmp_path / "missing.txt"), "--config", TEXT_SMOKE, "--output", str(out)], capsys)
    assert code == 2 and "does not exist" in _one_error_line(err)
    assert not out.exists() or not any(out.iterdir())


def test_prompts_file_runs_each_prompt_under_its_slug(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "prompts.txt"
    path.write_text("A red apple!\na red apple\na tall blue vase\n", encoding="utf-8")
    out = tmp_path / "logs"
    code, stdout, err = _run(["--prompts", str(path), "--config", TEXT_SMOKE, "--output", str(out), "--stage", "1",
                              "--quiet"] + FAST, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a-red-apple", "a-red-apple-2", "a-tall-blue-vase"]
    report = json.loads((out / "a-red-apple-2" / "a-red-apple-2_report.json").read_text())
    assert report["prompt"] == "a red apple" and report["stage"] == "1"
    assert "3 succeeded" in stdout


def test_long_prompt_warns_once_truncated(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "logs"
    long_prompt = "a ceramic mug " * 40
    code, stdout, err = _run(["--prompt", long_prompt, "--config", TEXT_SMOKE, "--output", str(out), "--stage", "1",
                              "--name", "long", "--quiet"] + FAST, capsys)
    assert code == 0, err
    warnings = [line for line in (stdout + err).splitlines() if "truncated" in line]
    assert len(warnings) == 1 and "77" in warnings[0]
    assert json.loads((out / "long" / "long_report.json").read_text())["prompt_truncated"] is True


def test_zero123_model_in_text_mode_is_one_line(tmp_path, capsys, monkeypatch):
    from hash3d_dg.guidance.tiny import write_tiny_checkpoint

    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    zero123 = write_tiny_checkpoint(tmp_path / "stable-zero123")
    out = tmp_path / "logs"
    code, _, err = _run(["--prompt", PROMPT, "--config", TEXT_SMOKE, "--model", str(zero123), "--output", str(out),
                         "--quiet"] + FAST, capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "Zero-1-to-3" in line and "--image" in line
    assert not any(out.iterdir())


def test_prompt_names_and_text():
    assert TextPrompt("  A  ceramic\tmug ").text == "A ceramic mug"
    assert prompt_names([TextPrompt("Mug!"), TextPrompt("mug"), TextPrompt("日本")]) == ["mug", "mug-2", "prompt"]
    assert str(TextPrompt("x" * 100)).endswith("...'")


def test_read_prompts_keeps_order_and_strips_bom(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffone\r\ntwo\n".encode("utf-8"))
    assert [p.text for p in read_prompts(path)] == ["one", "two"]


def test_prompt_stage_2_reuses_its_stage_1_result(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "logs"
    base = ["--prompt", PROMPT, "--config", TEXT_SMOKE, "--output", str(out), "--quiet"] + FAST
    code, _, err = _run(base + ["--stage", "2"], capsys)
    assert code == 2 and "no stage-1 result" in _one_error_line(err)
    code, _, err = _run(base + ["--stage", "1"], capsys)
    assert code == 0, err
    ply = (out / SLUG / f"{SLUG}_gaussians.ply").read_bytes()
    code, _, err = _run(base + ["--stage", "2"], capsys)
    assert code == 0, err
    folder = out / SLUG
    assert (folder / f"{SLUG}.glb").is_file() and (folder / f"{SLUG}_gaussians.ply").read_bytes() == ply
    report = json.loads((folder / f"{SLUG}_report.json").read_text())
    assert report["stage"] == "2" and "stage1" not in report and report["stage2"]["iters"] == 1
