"""The tiny autoencoder option (guidance.vae=tiny): TAESD layout, loading, load errors, and its use
for the renders' latents (SDS encode, refine encode/decode) while the reference stays on the
checkpoint's own VAE."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderTiny

from hash3d_dg.config import build_config
from hash3d_dg.guidance import ModelLoadError, Zero123Guidance, load_zero123, write_tiny_checkpoint
from hash3d_dg.guidance.loading import load_latent_vae, load_tiny_vae, resolve_vae_kind
from hash3d_dg.guidance.tiny import taesd_config, write_tiny_taesd


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    return write_tiny_taesd(tmp_path_factory.mktemp("vae") / "taesd")


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    root = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-stable-zero123-diffusers")
    return load_zero123(str(root), device="cpu", dtype=torch.float32)


def test_layout_is_taesd_and_loads_frozen(taesd_dir):
    files = sorted(p.name for p in taesd_dir.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((taesd_dir / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderTiny"
    assert config["scaling_factor"] == 1.0 and config["latent_channels"] == 4
    # TAESD's structure (4 stages each way, latent = image / 8), only narrower and shallower
    for name in ("num_encoder_blocks", "num_decoder_blocks", "encoder_block_out_channels"):
        assert len(config[name]) == len(taesd_config()[name]) == 4
    vae = load_tiny_vae(str(taesd_dir), "cpu", torch.float32)
    assert isinstance(vae, AutoencoderTiny)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert not vae.is_gradient_checkpointing
    # also found in a vae/ subfolder (a TAESD copy inside a pipeline-style tree)
    nested = taesd_dir.parent / "pipeline"
    write_tiny_taesd(nested / "vae")
    assert isinstance(load_tiny_vae(str(nested), "cpu", torch.float32), AutoencoderTiny)


def test_load_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in ("nobody-here/taesd-does-not-exist", str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(ModelLoadError) as info:
            load_tiny_vae(source)
        message = str(info.value)
        assert "\n" not in message and "tiny autoencoder" in message and source in message
        assert "guidance.tiny_vae=" in message
    # a directory holding another autoencoder class
    write_tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ModelLoadError, match="AutoencoderTiny|failed to load"):
        load_tiny_vae(str(tmp_path / "ckpt"))


def test_unreachable_hub_id_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelLoadError) as info:
        load_tiny_vae("nobody-here/taesd-not-on-the-hub")
    assert "\n" not in str(info.value)


def test_vae_kind_resolution_and_config():
    assert resolve_vae_kind("auto", "fast") == "tiny"
    assert resolve_vae_kind("auto", "paper") == "full"
    assert resolve_vae_kind("auto", "off") == "full"
    assert resolve_vae_kind("full", "fast") == "full"
    assert resolve_vae_kind("tiny", "off") == "tiny"
    with pytest.raises(ValueError):
        resolve_vae_kind("small", "off")
    cfg = build_config({}, ["guidance.vae=tiny", "guidance.tiny_vae=/some/dir"])
    assert cfg.guidance.vae == "tiny" and cfg.guidance.tiny_vae == "/some/dir"
    assert build_config({}).guidance.tiny_vae == "madebyollin/taesd"
    assert load_latent_vae(build_config({}).guidance, "paper", "cpu", torch.float32) is None


def test_guidance_encodes_and_decodes_renders_with_the_tiny_vae(components, taesd_dir):
    vae = load_tiny_vae(str(taesd_dir), "cpu", torch.float32)
    guidance = Zero123Guidance(components, image_size=32, seed=0, latent_vae=vae)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    # TAESD's encoder takes images in [0, 1] (EncoderTiny maps the [-1, 1] input back), and its
    # latents are used as they are (scaling factor 1, no posterior sample).
    latents = guidance.encode_images(images)
    with torch.no_grad():
        expected = vae.encoder.layers(images)
    assert latents.shape == (2, 4, 4, 4)
    assert torch.allclose(latents, expected, atol=1e-5)
    # the same latents every call (no draw from the guidance's generator)
    assert torch.equal(guidance.encode_images(images), latents)
    # decode: TAESD's decoder output in [-1, 1] -> [0, 1]
    decoded = guidance.decode_latents(latents)
    with torch.no_grad():
        raw = vae.decoder.layers(torch.tanh(latents / 3.0) * 3.0)
    assert torch.allclose(decoded, raw.clamp(0, 1), atol=1e-5)

    # The reference latent still comes from the checkpoint's own VAE (unscaled posterior mode).
    ref = torch.rand(1, 3, 32, 32, generator=g)
    guidance.set_reference(ref, 0.0)
    with torch.no_grad():
        own = components.vae.encode(ref.clamp(0, 1) * 2 - 1).latent_dist.mode()
    assert torch.allclose(guidance.ref_latents, own, atol=1e-6)

    # SDS gradients reach the rendered pixels through the tiny encoder.
    pixels = images.clone().requires_grad_(True)
    loss = guidance.sds(pixels, [10.0, -5.0], [30.0, 200.0], [0.0, 0.0], step_ratio=0.5)
    loss.backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0

    refined = guidance.refine(images[:1], [10.0], [30.0], [0.0], strength=0.9, steps=10)
    assert refined.shape == (1, 3, 32, 32) and 0 <= float(refined.min()) <= float(refined.max()) <= 1


def test_full_vae_path_unchanged_without_tiny(components):
    guidance = Zero123Guidance(components, image_size=32, seed=0)
    assert guidance.latent_vae is None
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = components.vae.encode(images * 2 - 1).latent_dist.sample(generator=gen) * 0.18215
        got = guidance.encode_images(images)
    assert torch.allclose(got, expected, atol=1e-6)


def test_pipeline_builds_the_tiny_vae_for_fast_mode(tmp_path, monkeypatch):
    from hash3d_dg.pipeline import build_guidance

    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    fast = build_config({"guidance": {"model": "builtin:tiny"}, "hash3d": {"mode": "fast"}})
    guidance = build_guidance(fast, torch.device("cpu"), torch.float32)
    assert isinstance(guidance.latent_vae, AutoencoderTiny)
    from hash3d_dg.guidance.unet_split import UNetSplit

    unet = guidance.components.unet
    assert guidance.denoiser.model.cache_point == UNetSplit(unet, fast.hash3d.cache_point).cache_point
    paper = build_config({"guidance": {"model": "builtin:tiny"}, "hash3d": {"mode": "paper"}})
    paper_guidance = build_guidance(paper, torch.device("cpu"), torch.float32)
    assert paper_guidance.latent_vae is None
    assert paper_guidance.denoiser.model.cache_point == (len(unet.up_blocks) - 1, 1)  # the paper point
    full = build_config({"guidance": {"model": "builtin:tiny", "vae": "full"}, "hash3d": {"mode": "fast"}})
    assert build_guidance(full, torch.device("cpu"), torch.float32).latent_vae is None
