"""GPU speed settings and their CPU behaviour: fused Adam, channels_last, the torch-rasteriser
fallback line, gsplat's op state, nvcc in the doctor."""

import logging

import pytest
import torch

from hash3d_dg import accel
from hash3d_dg.config import ConfigError, build_config


def test_switches_are_on_for_accelerators_only_by_default():
    assert accel.resolve_switch("auto", "cuda") and not accel.resolve_switch("auto", "cpu")
    assert accel.resolve_switch("on", "cpu") and not accel.resolve_switch("off", "cuda")
    with accel.virtual():
        assert accel.resolve_switch("auto", "cpu")
    assert accel.adam_options("auto", "cpu") == {} and accel.adam_options("auto", "cuda") == {"fused": True}
    for key in ("stage1.fused_adam", "stage2.fused_adam", "guidance.channels_last"):
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=name):
            build_config({section: {name: "sometimes"}})


def test_fused_adam_on_the_cpu_when_asked():
    from hash3d_dg.gaussians import GaussianModel
    from hash3d_dg.stages.stage1 import make_optimizer

    model = GaussianModel.random_init(20, seed=0)
    cfg = build_config({"stage1": {"fused_adam": "on"}})
    opt = make_optimizer(model, cfg.stage1)
    assert opt.defaults["fused"] is True
    loss = sum(p.square().sum() for p in model.params.values())
    loss.backward()
    opt.step()  # the CPU has a fused kernel too
    assert make_optimizer(model, build_config({}).stage1).defaults.get("fused") in (None, False)


def test_channels_last_setting_changes_the_layout_only(monkeypatch, tmp_path):
    from hash3d_dg.config import TINY_MODEL
    from hash3d_dg.pipeline import build_guidance

    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    values = {"device": "cpu", "guidance": {"model": TINY_MODEL, "image_size": 32}}
    plain = build_guidance(build_config(values), torch.device("cpu"), torch.float32)
    values["guidance"]["channels_last"] = "on"
    cl = build_guidance(build_config(values), torch.device("cpu"), torch.float32)
    w = cl.components.unet.conv_in.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert plain.components.unet.conv_in.weight.is_contiguous()
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(cl.encode_images(x), plain.encode_images(x), rtol=1e-4, atol=1e-4)


def test_a_cuda_run_without_gsplat_says_so_in_one_line(monkeypatch, caplog):
    from hash3d_dg.gaussians import backends

    monkeypatch.setattr(backends, "gaussian_backend_status",
                        lambda name, device, probe_cuda=True: "gsplat is not installed")
    backends._warn_torch_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hash3d_dg.gaussians.backends"):
        assert backends.resolve_gaussian_backend("auto", "cuda") == "torch"
        assert backends.resolve_gaussian_backend("auto", "cuda") == "torch"
        assert backends.resolve_gaussian_backend("auto", "cpu") == "torch"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "torch Gaussian rasteriser" in lines[0] and "\n" not in lines[0]


def test_gsplat_op_state_follows_the_jit_build(monkeypatch, tmp_path):
    import importlib.util

    from hash3d_dg.gaussians import backends

    if importlib.util.find_spec("gsplat.csrc") is not None:
        pytest.skip("a prebuilt gsplat")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert backends.gsplat_op_state() == "not built"
    (tmp_path / "gsplat_cuda").mkdir()
    (tmp_path / "gsplat_cuda" / "gsplat_cuda.so").write_bytes(b"")
    assert backends.gsplat_op_state() == "built"
    assert backends.gsplat_op_path() == str(tmp_path / "gsplat_cuda" / "gsplat_cuda.so")


def test_doctor_reports_nvcc(monkeypatch):
    from hash3d_dg.apps import doctor

    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(doctor.os.path if hasattr(doctor, "os") else __import__("os").path,
                        "isfile", lambda path: False)
    (name, ok, detail), = doctor.check_nvcc()
    assert name == "nvcc" and not ok and "gsplat" in detail


def test_a_complete_cached_snapshot_loads_without_asking_the_hub(monkeypatch, tmp_path):
    import huggingface_hub

    from hash3d_dg.guidance import loading

    snap = tmp_path / "snap"
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text("{}")
    calls = []

    def snapshot_download(repo, allow_patterns=None, local_files_only=False):
        calls.append(("snapshot", local_files_only))
        return str(snap)

    def model_info(*args, **kwargs):
        calls.append(("probe",))
        raise AssertionError("no hub round trip expected")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(loading, "_hub_offline", lambda: False)
    assert loading._resolve_local_dir("someone/some-model") == snap
    assert calls == [("snapshot", True)]
