"""`python -m hash3d_dg.bench gpu`: its CPU behaviour, its part runner, and the parts that also
run on a CPU (the end-to-end run and the timings, small, with the tiny architecture)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from hash3d_dg.bench import gpu, gpu_parts
from hash3d_dg.bench.__main__ import main as bench_main
from hash3d_dg.bench.gpu_checkpoint import full_image_encoder_config, write_random_checkpoint


def test_help_documents_the_command(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["gpu", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("CUDA", "--out", "--budget-s", "gpu_bench.json", "gsplat", "nvdiffrast",
                   "pytest -m cuda", "exits 2"):
        assert needle in text, needle


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_on_cpu_it_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench_main(["gpu", "--json", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "Traceback" not in captured.err
    assert not out.exists()


def test_part_runner_kills_an_overrunning_part_and_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time\n"
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
              "time.sleep(120)\n")
    start = time.monotonic()
    run = gpu.run_command_part("slow", [sys.executable, "-c", script], tmp_path / "slow.log",
                               timeout=3.0, env=dict(os.environ))
    assert run["status"] == "timeout" and run["returncode"] is None
    assert time.monotonic() - start < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # a killed child reparented to init may linger as a zombie for a moment
        stat = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True,
                              text=True).stdout.strip()
        if not stat or stat.startswith("Z"):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the part's child process survived the timeout")
    ok = gpu.run_command_part("fast", [sys.executable, "-c", "print('hi')"],
                              tmp_path / "fast.log", timeout=60.0, env=dict(os.environ))
    assert ok["status"] == "ok" and ok["returncode"] == 0
    assert "hi" in (tmp_path / "fast.log").read_text()


def test_parse_pytest_summary():
    text = "....s\n=== short test summary ===\n1 failed, 12 passed, 3 skipped, 40 deselected, 1 error in 9.1s\n"
    assert gpu_parts.parse_pytest_summary(text) == {"passed": 12, "failed": 1, "skipped": 3,
                                                    "deselected": 40, "errors": 1}
    assert gpu_parts.parse_pytest_summary("no tests ran in 0.01s")["passed"] == 0


def test_full_size_architecture_matches_the_real_models():
    """The random full-size checkpoint has the real parameter counts (meta device, no weights):
    UNet 859.5 M, VAE 83.65 M, CLIP ViT-L/14 vision tower + 768 projection 303.97 M."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    from hash3d_dg.guidance.tiny import stable_zero123_unet_config, stable_zero123_vae_config

    with torch.device("meta"):
        counts = [sum(p.numel() for p in m.parameters()) for m in (
            UNet2DConditionModel(**stable_zero123_unet_config()),
            AutoencoderKL(**stable_zero123_vae_config()),
            CLIPVisionModelWithProjection(full_image_encoder_config()))]
    assert counts == [859_532_484, 83_653_863, 303_966_208]


def test_e2e_and_timing_parts_on_cpu_feed_the_summary(tmp_path, monkeypatch):
    """The e2e part runs the real product (tiny random checkpoint written by the bench's own
    writer and loaded by the product's loader) and reports every phase; the summary reads it."""
    from hash3d_dg.guidance import load_zero123

    ckpt = write_random_checkpoint(tmp_path / "random-stable-zero123-diffusers", arch="tiny")
    comp = load_zero123(str(ckpt))
    assert comp.family == "stable" and comp.unet.config.in_channels == 8
    monkeypatch.setenv("HASH3D_DG_BENCH_SCRATCH", str(tmp_path / "scratch"))
    small = ["guidance.image_size=64", "stage1.ref_size=64", "stage1.render_res=[64,64,64]",
             "stage1.num_pts=500", "stage2.render_res=64", "mesh.resolution=32", "mesh.density_thresh=0.3",
             "mesh.texture_size=64", "mesh.bake_render_size=64", "output.preview_size=32",
             "output.turntable_frames=2", "output.contact_sheet_views=2"]
    e2e = gpu_parts.part_e2e("paper", str(ckpt), tmp_path, iters=2, iters_refine=1,
                             decimate_target=2000, backends=[], device="cpu", extra=small)
    phases = e2e["phases_s"]
    for phase in ("stage1", "mesh", "uv", "bake", "stage2", "export"):
        assert isinstance(phases[phase], float) and phases[phase] >= 0, phase
    assert e2e["finite"] and e2e["backends"] == {"gaussian": "torch", "mesh": "torch"}
    assert "ball_paper.glb" in e2e["outputs"]
    assert e2e["unet_total"]["full_calls"] + e2e["unet_total"]["shallow_calls"] > 0
    # instrumentation is gone afterwards
    from hash3d_dg.mesh.mesh import Mesh
    from hash3d_dg.stages import meshing

    assert meshing.extract_mesh.__name__ == "extract_mesh"
    assert Mesh.unwrap_uv.__name__ == "unwrap_uv"

    missing = gpu_parts.part_e2e("no-such-mode", str(ckpt), tmp_path, 1, 1, 2000, [], "cpu")
    assert missing["skipped"] and "no-such-mode" in missing["reason"]

    timing = gpu_parts.part_timing([], device="cpu", quick=True)
    row = next(iter(timing["gaussian"].values()))["torch"]
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["host_syncs"] is None

    results = {"machine": {"gpu": "test"}, "budget_s": 1, "wall_s": 1,
               "parts": {"build-gsplat": {"status": "ok", "available": False,
                                          "reason": "gsplat's CUDA op did not build"},
                         "tests": {"status": "skipped", "reason": "--skip"},
                         "timing": {"status": "ok", **timing},
                         "e2e-paper": {"status": "ok", **e2e},
                         "e2e-fast": {"status": "skipped", "reason": missing["reason"]}}}
    results["failures"] = gpu.failures(results)
    assert results["failures"] == []
    text = gpu.summarize(results)
    assert "gsplat gsplat's CUDA op did not build" in text
    assert "e2e-paper: stage1" in text and "e2e-fast: skipped" in text
    assert text.splitlines()[-1] == "result: all checks passed"
    results["parts"]["e2e-paper"]["finite"] = False
    assert gpu.failures(results) == ["e2e-paper: non-finite losses"]
