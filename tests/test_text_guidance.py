"""Text to 3D: the tiny Stable Diffusion checkpoint, its loader, the SD guidance and the SD UNet split."""

import json
import logging
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from hash3d_dg.cache import CachedDenoiser, make_cache
from hash3d_dg.guidance.unet_split import UNetSplit
from hash3d_dg.cache.config import NAMED_CACHE_POINTS, Hash3DConfig
from hash3d_dg.errors import InputError
from hash3d_dg.guidance.loading import ModelLoadError
from hash3d_dg.guidance.sd import StableDiffusionGuidance
from hash3d_dg.guidance.sd_loading import load_stable_diffusion
from hash3d_dg.guidance.tiny import write_tiny_checkpoint
from hash3d_dg.guidance.tiny_sd import (MAX_TOKENS, tiny_sd_unet_config, write_tiny_clip_tokenizer,
                                        write_tiny_sd_checkpoint)

PROMPT = "a ceramic mug with a blue glaze"


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return write_tiny_sd_checkpoint(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def components(sd_dir):
    return load_stable_diffusion(str(sd_dir))


def make_guidance(components, **kwargs):
    kwargs.setdefault("image_size", 64)
    guidance = StableDiffusionGuidance(components, **kwargs)
    guidance.set_reference(None, 0.0)
    guidance.set_prompt(PROMPT, "blurry")
    return guidance


# ---------------------------------------------------------------------- the tiny checkpoint


def test_tiny_checkpoint_has_the_real_layout(sd_dir):
    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor"):
        assert (sd_dir / sub).is_dir(), sub
    assert (sd_dir / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (sd_dir / "text_encoder" / "model.fp16.safetensors").is_file()
    assert (sd_dir / "tokenizer" / "vocab.json").is_file() and (sd_dir / "tokenizer" / "merges.txt").is_file()
    assert json.loads((sd_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    assert not list(sd_dir.rglob("*.bin")) and not list(sd_dir.rglob("*.py"))


def test_tiny_tokenizer_is_a_clip_bpe(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tiny_clip_tokenizer(tmp_path / "tok")))
    assert tok.model_max_length == MAX_TOKENS
    ids = tok([PROMPT], padding="max_length", max_length=MAX_TOKENS).input_ids[0]
    assert len(ids) == MAX_TOKENS
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|startoftext|>" and "mug</w>" in tokens and "blue</w>" in tokens  # merges applied
    assert tokens[tokens.index("<|endoftext|>"):] == ["<|endoftext|>"] * (MAX_TOKENS - tokens.index("<|endoftext|>"))
    assert tok.decode(tok(PROMPT).input_ids, skip_special_tokens=True).strip() == PROMPT


# ---------------------------------------------------------------------- loading


def test_loads_fp16_variant_and_plain_weights(components, tmp_path):
    assert components.family == "sd2" and components.dtype == torch.float32
    assert components.unet.config.use_linear_projection
    assert type(components.scheduler).__name__ == "DDIMScheduler"
    assert not any(p.requires_grad for p in components.unet.parameters())
    plain = write_tiny_sd_checkpoint(tmp_path / "plain", variant=None)
    assert (plain / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_stable_diffusion(str(plain))
    a = dict(loaded.unet.named_parameters())
    for name, p in components.unet.named_parameters():
        assert torch.equal(p, a[name]), name


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_zero123_checkpoint_is_refused_for_text(tmp_path):
    z = write_tiny_checkpoint(tmp_path / "stable-zero123")
    with pytest.raises(ModelLoadError) as exc:
        load_stable_diffusion(str(z))
    line = _one_line(exc)
    assert "Zero-1-to-3" in line and "--image" in line and "stable-diffusion-2-1-base" in line


def test_checkpoint_without_tokenizer_is_refused(sd_dir, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ModelLoadError) as exc:
        load_stable_diffusion(str(broken))
    assert "'tokenizer'" in _one_line(exc) and "--model" in _one_line(exc)
    (broken / "tokenizer").mkdir()
    with pytest.raises(ModelLoadError) as exc:
        load_stable_diffusion(str(broken))
    assert "vocab.json" in _one_line(exc)


def test_unreachable_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as exc:
        load_stable_diffusion("someone/no-such-model")
    assert "Stable Diffusion" in _one_line(exc) and "--model /path/to/no-such-model" in _one_line(exc)
    with pytest.raises(ModelLoadError) as exc:
        load_stable_diffusion(str(tmp_path / "missing"))
    assert "no such directory" in _one_line(exc)


def test_corrupt_weights_are_one_line(sd_dir, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(sd_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError) as exc:
        load_stable_diffusion(str(broken))
    assert "'unet'" in _one_line(exc)


# ---------------------------------------------------------------------- the guidance


def test_prompt_embeddings_once_and_bad_prompts(components, caplog):
    guidance = make_guidance(components)
    pos, neg = guidance.embeddings["pos"], guidance.embeddings["neg"]
    assert pos.shape == (1, MAX_TOKENS, 32) and not torch.equal(pos, neg)
    for bad in ("", "   \t\n "):
        with pytest.raises(InputError) as exc:
            guidance.set_prompt(bad)
        assert "empty" in _one_line(exc)
    with caplog.at_level(logging.WARNING, logger="hash3d_dg"):
        guidance.set_prompt("glaze " * 120)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("hash3d_dg")]
    assert len(lines) == 1 and "truncated" in lines[0] and "77" in lines[0]
    assert guidance.truncated and guidance.embeddings["pos"].shape[1] == MAX_TOKENS
    with pytest.raises(ValueError):
        guidance.set_reference(torch.zeros(1, 3, 8, 8), 0.0)


def test_sds_is_dreamgaussians_formula(components):
    """CFG [prompt; negative] with scale s, w(t) = 1 - alpha_bar_t, grad on the latents."""
    guidance = make_guidance(components, guidance_scale=100.0)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=g).requires_grad_(True)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    loss = guidance.sds_latents(latents, [10.0], [40.0], [0.0], step_ratio=0.25, noise=noise)
    loss.backward()
    t = 750
    ab = guidance.scheduler.alphas_cumprod[t]
    x_t = ab.sqrt() * latents.detach() + (1 - ab).sqrt() * noise
    unet = components.unet
    with torch.no_grad():
        cond = unet(x_t, t, encoder_hidden_states=guidance.embeddings["pos"]).sample
        uncond = unet(x_t, t, encoder_hidden_states=guidance.embeddings["neg"]).sample
    expected = (1 - ab) * (uncond + 100.0 * (cond - uncond) - noise)
    assert torch.allclose(latents.grad, expected, rtol=1e-4, atol=1e-4)


def test_refine_runs_the_strength_schedule(components):
    guidance = make_guidance(components)
    image = torch.rand(1, 3, 40, 40)
    out = guidance.refine(image, [0.0], [90.0], [0.0], strength=0.8, steps=50)
    assert out.shape == (1, 3, 64, 64) and 0 <= float(out.min()) <= float(out.max()) <= 1
    assert guidance.stats()["unet"]["full_calls"] == 10


def test_cache_keys_are_the_absolute_camera(components):
    cfg = Hash3DConfig.preset("paper", eta=1.0)
    denoiser = CachedDenoiser(UNetSplit(components.unet, cfg.cache_point), make_cache(cfg, seed=0))
    guidance = StableDiffusionGuidance(components, denoiser=denoiser, image_size=64, hash3d=cfg, radius=2.5)
    guidance.set_reference(None, -10.0)
    guidance.set_prompt(PROMPT)
    seen = []
    real_insert = denoiser.cache.insert
    denoiser.cache.insert = lambda key, *a: (seen.append(key), real_insert(key, *a))[1]
    guidance.sds(torch.rand(2, 3, 16, 16), [5.0, -20.0], [30.0, -170.0], [0.0, 0.1], step_ratio=0.5)
    assert [(k.elevation, k.azimuth, k.radius, k.timestep) for k in seen] == [
        (-5.0, 30.0, 2.5, 500.0), (-30.0, -170.0, 2.6, 500.0)]
    # the same view again: served from the table (eta 1), the shallow path
    guidance.sds(torch.rand(1, 3, 16, 16), [5.0], [30.0], [0.0], step_ratio=0.5)
    assert guidance.stats()["unet"]["shallow_calls"] == 1
    guidance.reset(0)
    assert guidance.stats()["unet"] == {"full_calls": 0, "shallow_calls": 0} and not guidance.embeddings


def test_v_prediction_is_served_as_eps(components):
    import copy

    from diffusers import DDIMScheduler

    comp = copy.copy(components)
    comp.scheduler = DDIMScheduler.from_config(components.scheduler.config, prediction_type="v_prediction")
    guidance = make_guidance(comp, guidance_scale=1.0)
    assert guidance.v_prediction and guidance.refine_scheduler.config.prediction_type == "epsilon"
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = guidance.condition([0.0], [0.0], [0.0], 1)
    eps = guidance.predict(x_t, 400, cond)
    ab = guidance.alphas_cumprod[400]
    with torch.no_grad():
        v = components.unet(x_t, 400, encoder_hidden_states=guidance.embeddings["pos"]).sample
    assert torch.allclose(eps, ab.sqrt() * v + (1 - ab).sqrt() * x_t, atol=1e-5)


def test_fused_steps_of_a_v_prediction_model_are_bitwise_the_eager_steps(components):
    """The graphed SDS and refine steps (run eagerly on the CPU: the same buffers and ops) serve a
    v-prediction checkpoint as eps exactly as the eager steps do, with a table (paper)."""
    import copy

    from diffusers import DDIMScheduler

    from hash3d_dg.guidance.acceleration import attach_graphs

    comp = copy.copy(components)
    comp.scheduler = DDIMScheduler.from_config(components.scheduler.config, prediction_type="v_prediction")
    cfg = Hash3DConfig.preset("paper", eta=1.0)
    results = []
    for graphed in (False, True):
        denoiser = CachedDenoiser(UNetSplit(comp.unet, cfg.cache_point), make_cache(cfg, seed=0))
        guidance = make_guidance(comp, denoiser=denoiser, hash3d=cfg)
        if graphed:
            attach_graphs(guidance, capture=False)
        gen = torch.Generator().manual_seed(4)
        out = []
        for i in range(3):
            x = torch.rand(1, 3, 40, 40, generator=gen).requires_grad_()
            loss = guidance.sds(x, [0.0], [3.0 * i], [0.0], step_ratio=0.5)
            loss.backward()
            out += [loss.detach(), x.grad]
        out.append(guidance.refine(torch.rand(1, 3, 40, 40, generator=gen), [0.0], [3.0], [0.0],
                                   strength=0.5, steps=10))
        results.append((out, guidance.stats()))
    (a, sa), (b, sb) = results
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and sa == sb
    assert sb["unet"]["shallow_calls"] > 0


# ---------------------------------------------------------------------- the SD UNet split


SD2_UNETS = {
    "tiny_sd2": tiny_sd_unet_config(),
    "sd2_three_levels": dict(tiny_sd_unet_config(), attention_head_dim=[1, 2, 4], block_out_channels=[32, 32, 64],
                             down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
}


@pytest.mark.parametrize("name", list(SD2_UNETS))
def test_sd2_unet_split_is_exact_at_every_named_point(name):
    """Linear projections, per-level head counts, a 77-token context: shallow from the exact
    feature equals the full forward (0.0 in fp32) and the UNet's own forward."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_UNETS[name]).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, MAX_TOKENS, 32, generator=g)
    t = torch.tensor([523, 523])
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=context).sample
        for point in NAMED_CACHE_POINTS:
            split = UNetSplit(unet, point)
            full, feature = split.full(x, t, context)
            shallow = split.shallow(x, t, context, feature)
            assert float((shallow - full).abs().max()) == 0.0, point
            assert float((full - reference).abs().max()) == 0.0, point
