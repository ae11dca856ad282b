"""The doctor command: runs, reports every backend, parses as JSON, never imports rembg."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from hash3d_dg.apps import doctor

REPO = Path(__file__).resolve().parents[1]
EXPECTED_NAMES = {
    "python",
    "torch",
    "cuda",
    "gaussian rasterizer: torch",
    "gaussian rasterizer: gsplat",
    "gaussian rasterizer: diff_gaussian_rasterization",
    "mesh rasterizer: torch",
    "mesh rasterizer: nvdiffrast",
    "simple_knn (CUDA distCUDA2)",
    f"model {doctor.DEFAULT_MODEL}",
    "ffmpeg",
    "node",
    "rembg",
    "onnxruntime",
}


def test_collect_reports_every_item():
    checks = doctor.collect()
    names = [name for name, _, _ in checks]
    assert EXPECTED_NAMES <= set(names)
    assert len(names) == len(set(names))
    for name, ok, detail in checks:
        assert isinstance(ok, bool) and isinstance(detail, str) and detail and "\n" not in detail, name
    by_name = {name: (ok, detail) for name, ok, detail in checks}
    assert by_name["torch"][0] and torch.__version__ in by_name["torch"][1]
    assert by_name["cuda"][0] == torch.cuda.is_available()
    assert by_name["gaussian rasterizer: torch"][0] and by_name["mesh rasterizer: torch"][0]
    if not torch.cuda.is_available():  # CUDA-only backends can never be usable without CUDA
        for name in ("gaussian rasterizer: gsplat", "gaussian rasterizer: diff_gaussian_rasterization",
                     "mesh rasterizer: nvdiffrast", "simple_knn (CUDA distCUDA2)"):
            assert not by_name[name][0], name


def _fake_cached_model(cache: Path, repo_id: str, files: list[str]) -> None:
    """Lay out a Hugging Face hub cache entry (refs/main -> snapshots/<commit>/...)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name in files:
        target = root / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("{}")


def test_model_check_reads_the_local_cache_only(tmp_path):
    repo_id = doctor.DEFAULT_MODEL
    (name, ok, detail), = doctor.check_model(repo_id, cache_dir=str(tmp_path))
    assert not ok and "hf download" in detail and "model_index.json" in detail
    _fake_cached_model(tmp_path, repo_id, ["model_index.json"])
    (_, ok, detail), = doctor.check_model(repo_id, cache_dir=str(tmp_path))
    assert not ok and "unet/diffusion_pytorch_model.safetensors" in detail
    _fake_cached_model(tmp_path / "full", repo_id, list(doctor.MODEL_FILES))
    (_, ok, detail), = doctor.check_model(repo_id, cache_dir=str(tmp_path / "full"))
    assert ok and "snapshots" in detail


def test_main_prints_one_line_per_item(capsys):
    assert doctor.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(doctor.collect())
    assert any(line.split()[1] == "torch" for line in lines)
    assert all(line[:2] in ("ok", "--") for line in lines)


def test_python_dash_m_json_output_and_no_rembg_import():
    # -X importtime lists every module imported, on stderr.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hash3d_dg.apps.doctor", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported  # the listing works
    assert not {name for name in imported if name.split(".")[0] == "rembg"}
    report = json.loads(result.stdout)
    assert EXPECTED_NAMES <= {item["name"] for item in report}
    assert all(set(item) == {"name", "ok", "detail"} for item in report)
