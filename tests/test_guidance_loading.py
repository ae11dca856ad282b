"""Zero-1-to-3 checkpoint layout, loading and load errors, on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hash3d_dg.guidance import (
    CLIPCameraProjection,
    ModelLoadError,
    load_zero123,
    resolve_family,
    stable_zero123_unet_config,
    stable_zero123_vae_config,
    write_tiny_checkpoint,
)

SUBFOLDERS = ["clip_camera_projection", "feature_extractor", "image_encoder", "scheduler", "unet", "vae"]
FILES = {
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "image_encoder/config.json",
    "image_encoder/model.safetensors",
    "feature_extractor/preprocessor_config.json",
    "scheduler/scheduler_config.json",
    "clip_camera_projection/config.json",
    "clip_camera_projection/diffusion_pytorch_model.safetensors",
    "clip_camera_projection/zero123.py",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "stable": write_tiny_checkpoint(root / "tiny-stable-zero123-diffusers", family="stable"),
        "xl": write_tiny_checkpoint(root / "tiny-zero123-xl-diffusers", family="xl"),
    }


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_layout_matches_real_tree(checkpoints):
    for ckpt in checkpoints.values():
        files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
        assert files == FILES
        assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == SUBFOLDERS

        index = _read(ckpt / "model_index.json")
        assert index["_class_name"] == "Zero123Pipeline"
        assert "_diffusers_version" in index
        assert index["safety_checker"] == [None, None]
        assert index["requires_safety_checker"] is False
        assert index["clip_camera_projection"] == ["zero123", "CLIPCameraProjection"]
        assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
        assert index["vae"] == ["diffusers", "AutoencoderKL"]
        assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
        assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
        assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]

        unet = _read(ckpt / "unet/config.json")
        assert unet["_class_name"] == "UNet2DConditionModel"
        assert (unet["in_channels"], unet["out_channels"]) == (8, 4)
        assert unet["up_block_types"][-1] == "CrossAttnUpBlock2D"
        vae = _read(ckpt / "vae/config.json")
        assert vae["scaling_factor"] == 0.18215 and len(vae["block_out_channels"]) == 4
        assert vae["latent_channels"] == 4
        enc = _read(ckpt / "image_encoder/config.json")
        assert enc["architectures"] == ["CLIPVisionModelWithProjection"]
        assert enc["projection_dim"] == unet["cross_attention_dim"]
        proj = _read(ckpt / "clip_camera_projection/config.json")
        assert proj["_class_name"] == "CLIPCameraProjection"
        assert proj["additional_embeddings"] == 4 and proj["embedding_dim"] == enc["projection_dim"]
        sched = _read(ckpt / "scheduler/scheduler_config.json")
        assert sched["_class_name"] == "DDIMScheduler"
        assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
        assert (sched["prediction_type"], sched["steps_offset"]) == ("epsilon", 1)
        assert sched["clip_sample"] is False and sched["set_alpha_to_one"] is False
        fe = _read(ckpt / "feature_extractor/preprocessor_config.json")
        assert fe["resample"] == 3 and fe["do_center_crop"] is True
        assert fe["crop_size"] == {"height": enc["image_size"], "width": enc["image_size"]}
        assert fe["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
        assert fe["image_std"] == [0.26862954, 0.26130258, 0.27577711]

        for weights in ckpt.rglob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
                assert keys
                assert all(f.get_tensor(k).dtype == torch.float16 for k in keys), weights
        with safe_open(str(ckpt / "clip_camera_projection/diffusion_pytorch_model.safetensors"), "pt") as f:
            assert sorted(f.keys()) == ["proj.bias", "proj.weight"]
            assert tuple(f.get_tensor("proj.weight").shape) == (proj["embedding_dim"], proj["embedding_dim"] + 4)


def test_tiny_checkpoint_is_seeded(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=3)
    b = write_tiny_checkpoint(tmp_path / "b", seed=3)
    c = write_tiny_checkpoint(tmp_path / "c", seed=4)
    name = "unet/diffusion_pytorch_model.safetensors"
    with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb, safe_open(str(c / name), "pt") as fc:
        key = "conv_in.weight"
        assert torch.equal(fa.get_tensor(key), fb.get_tensor(key))
        assert not torch.equal(fa.get_tensor(key), fc.get_tensor(key))


@pytest.mark.parametrize("family", ["stable", "xl"])
def test_load_components(checkpoints, family):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    ckpt = checkpoints[family]
    comp = load_zero123(str(ckpt))
    assert comp.family == family  # by name: "stable" in the path or not
    assert comp.model_id == str(ckpt)
    assert comp.device == torch.device("cpu") and comp.dtype == torch.float32
    assert isinstance(comp.unet, UNet2DConditionModel)
    assert isinstance(comp.vae, AutoencoderKL)
    assert isinstance(comp.image_encoder, CLIPVisionModelWithProjection)
    assert isinstance(comp.feature_extractor, CLIPImageProcessorPil)
    assert isinstance(comp.scheduler, DDIMScheduler)
    assert isinstance(comp.camera_projection, CLIPCameraProjection)
    for module in (comp.unet, comp.vae, comp.image_encoder, comp.camera_projection):
        assert not module.training
        params = list(module.parameters())
        assert params and all(p.dtype == torch.float32 and not p.requires_grad for p in params)
    # The weights are the file's (not a silent random re-initialisation).
    with safe_open(str(ckpt / "clip_camera_projection/diffusion_pytorch_model.safetensors"), "pt") as f:
        assert torch.equal(comp.camera_projection.proj.weight, f.get_tensor("proj.weight").float())
    with safe_open(str(ckpt / "image_encoder/model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("visual_projection.weight"))
        assert torch.equal(comp.image_encoder.visual_projection.weight, f.get_tensor(key).float())
    with safe_open(str(ckpt / "unet/diffusion_pytorch_model.safetensors"), "pt") as f:
        assert torch.equal(comp.unet.conv_out.weight, f.get_tensor("conv_out.weight").float())


def test_load_fp16_and_explicit_family(checkpoints):
    comp = load_zero123(str(checkpoints["stable"]), dtype=torch.float16, family="xl")
    assert comp.family == "xl" and comp.dtype == torch.float16
    for module in (comp.unet, comp.vae, comp.image_encoder, comp.camera_projection):
        assert all(p.dtype == torch.float16 for p in module.parameters())


def test_camera_projection_forward():
    proj = CLIPCameraProjection(embedding_dim=6, additional_embeddings=4)
    x = torch.randn(3, 1, 10)
    expected = x @ proj.proj.weight.T + proj.proj.bias
    out = proj(x)
    assert out.shape == (3, 1, 6)
    torch.testing.assert_close(out, expected)


def _assert_one_line_error(excinfo, model: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert model in message
    assert "local directory" in message and "--model" in message


def test_missing_directory_error(tmp_path):
    missing = str(tmp_path / "no-such-stable-zero123")
    with pytest.raises(ModelLoadError) as excinfo:
        load_zero123(missing)
    _assert_one_line_error(excinfo, missing)


def test_incomplete_checkpoint_error(checkpoints, tmp_path):
    broken = tmp_path / "broken-stable-zero123"
    shutil.copytree(checkpoints["stable"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError) as excinfo:
        load_zero123(str(broken))
    _assert_one_line_error(excinfo, str(broken))
    assert "vae" in str(excinfo.value)


def test_missing_weights_error(checkpoints, tmp_path):
    broken = tmp_path / "noweights-stable-zero123"
    shutil.copytree(checkpoints["stable"], broken)
    (broken / "clip_camera_projection/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as excinfo:
        load_zero123(str(broken))
    _assert_one_line_error(excinfo, str(broken))
    assert "clip_camera_projection" in str(excinfo.value)


def test_corrupt_weights_error(checkpoints, tmp_path):
    broken = tmp_path / "corrupt-stable-zero123"
    shutil.copytree(checkpoints["stable"], broken)
    weights = broken / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as excinfo:
        load_zero123(str(broken))
    _assert_one_line_error(excinfo, str(broken))
    assert "unet" in str(excinfo.value)


def test_offline_hub_id_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = "nobody-here/stable-zero123-does-not-exist"
    with pytest.raises(ModelLoadError) as excinfo:
        load_zero123(model)
    _assert_one_line_error(excinfo, model)


def test_unknown_hub_id_error(monkeypatch):
    # Without the offline flag: one quick hub probe (unreachable here, or "not found" online),
    # then a one-line error instead of per-component retries.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = "nobody-here/zero123-xl-does-not-exist"
    with pytest.raises(ModelLoadError) as excinfo:
        load_zero123(model)
    _assert_one_line_error(excinfo, model)


def test_resolve_family():
    assert resolve_family("ashawkey/stable-zero123-diffusers") == "stable"
    assert resolve_family("/models/Stable-Zero123") == "stable"
    assert resolve_family("ashawkey/zero123-xl-diffusers") == "xl"
    assert resolve_family("/models/zero123") == "xl"
    assert resolve_family("ashawkey/zero123-xl-diffusers", "stable") == "stable"
    assert resolve_family("ashawkey/stable-zero123-diffusers", "xl") == "xl"
    with pytest.raises(ValueError):
        resolve_family("x", "sd")


def test_full_size_configs_on_meta_device():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**stable_zero123_unet_config())
        vae = AutoencoderKL(**stable_zero123_vae_config())
    # SD-1.x UNet: 859,520,964 parameters with 4 input channels; 8 inputs add 4*320*3*3.
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964 + 4 * 320 * 9
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # the SD VAE
    assert unet.config.cross_attention_dim == 768 and unet.config.in_channels == 8
    assert vae.config.scaling_factor == 0.18215
