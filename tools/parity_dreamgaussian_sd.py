"""Parity of hash3d-dg's Stable Diffusion guidance with DreamGaussian's own ``StableDiffusion``.

DreamGaussian's ``guidance/sd_utils.py`` is fetched by the user (never committed here) and given
with ``--sd-utils PATH`` (the file) or ``--dreamgaussian DIR`` (a checkout or a bare git
directory of dreamgaussian/dreamgaussian; the file is read with ``git show HEAD:...``).

Both guidances load the same tiny random SD checkpoint (``write_tiny_sd_checkpoint``, plain-named
weights so that ``StableDiffusionPipeline.from_pretrained`` reads them; fp32, CPU) and see the
same prompt, negative prompt, rendered image, timestep and noise:

* SDS: DreamGaussian's ``train_step(pred_rgb, step_ratio)`` against ours ``sds`` at the same
  annealed timestep; the VAE posterior sample is the first draw of each side's generator (both
  seeded alike), the noise DreamGaussian draws (``torch.randn_like``) is recorded and handed to
  ours. Compared: the loss and the gradient w.r.t. the rendered pixels.
* Refine: ``refine(pred_rgb, guidance_scale=100, steps=50, strength)`` against ours ``refine``
  (the same recorded noise). Compared: the refined 512-px image.

Figures: max relative difference = max|ours - DG| / max|DG|.

    python tools/parity_dreamgaussian_sd.py --dreamgaussian /path/to/dreamgaussian \\
        --out benchmarks/results/parity_dreamgaussian_sd.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "a ceramic mug with a blue glaze"
NEGATIVE = "blurry, low quality"


def load_sd_utils(sd_utils: str | None = None, dreamgaussian: str | None = None, workdir: Path | None = None):
    """DreamGaussian's ``guidance/sd_utils.py`` as a module, and where it came from."""
    source = None
    if sd_utils:
        path = Path(sd_utils)
        source = f"{path}"
    else:
        repo = Path(dreamgaussian)
        if (repo / "guidance" / "sd_utils.py").is_file():
            path = repo / "guidance" / "sd_utils.py"
            source = str(path)
        else:
            text = subprocess.run(["git", "--git-dir", str(repo), "show", "HEAD:guidance/sd_utils.py"],
                                  check=True, capture_output=True, text=True).stdout
            commit = subprocess.run(["git", "--git-dir", str(repo), "rev-parse", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip()
            path = (workdir or Path(tempfile.mkdtemp())) / "dg_sd_utils.py"
            path.write_text(text)
            source = f"dreamgaussian/dreamgaussian@{commit}:guidance/sd_utils.py"
    spec = importlib.util.spec_from_file_location("dg_sd_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, source


@contextlib.contextmanager
def record_randn_like(store: list):
    real = torch.randn_like

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        store.append(out.detach().clone())
        return out

    torch.randn_like = wrapper
    try:
        yield
    finally:
        torch.randn_like = real


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    scale = float(theirs.abs().max())
    return float((ours - theirs).abs().max()) / (scale if scale > 0 else 1.0)


def run_parity(module, ckpt: Path, seed: int = 0, image_px: int = 64, step_ratios=(0.3, 0.8),
               strengths=(0.8, 0.95)) -> dict:
    from hash3d_dg.guidance.sd import StableDiffusionGuidance
    from hash3d_dg.guidance.sd_loading import load_stable_diffusion

    torch.set_num_threads(1)
    dg = module.StableDiffusion(torch.device("cpu"), fp16=False, vram_O=False, hf_key=str(ckpt))
    dg.get_text_embeds([PROMPT], [NEGATIVE])
    ours = StableDiffusionGuidance(load_stable_diffusion(str(ckpt)), guidance_scale=100.0, image_size=512, seed=seed)
    ours.set_reference(None, 0.0)
    ours.set_prompt(PROMPT, NEGATIVE)
    image = torch.rand(1, 3, image_px, image_px, generator=torch.Generator().manual_seed(seed + 7))
    results = {"prompt_embedding_rel": rel(ours.embeddings["pos"], dg.embeddings["pos"]),
               "negative_embedding_rel": rel(ours.embeddings["neg"], dg.embeddings["neg"])}
    for sr in step_ratios:
        noise: list = []
        x_dg = image.clone().requires_grad_(True)
        torch.manual_seed(seed)
        with record_randn_like(noise):
            loss_dg = dg.train_step(x_dg, step_ratio=sr, guidance_scale=100)
        loss_dg.backward()
        x_ours = image.clone().requires_grad_(True)
        ours.reset(seed)
        ours.set_prompt(PROMPT, NEGATIVE)
        latents = ours.encode(x_ours)
        loss_ours = ours.sds_x(latents, [0.0], [0.0], [0.0], step_ratio=sr, noise=noise[-1])
        loss_ours.backward()
        results[f"sds_loss_rel_sr{sr}"] = rel(loss_ours, loss_dg)
        results[f"sds_pixel_grad_rel_sr{sr}"] = rel(x_ours.grad, x_dg.grad)
        results[f"sds_timestep_sr{sr}"] = ours.timestep_for(sr)
    for strength in strengths:
        noise = []
        torch.manual_seed(seed)
        with record_randn_like(noise), torch.no_grad():
            refined_dg = dg.refine(image.clone(), guidance_scale=100, steps=50, strength=strength)
        ours.reset(seed)
        ours.set_prompt(PROMPT, NEGATIVE)
        ours.draw_noise = lambda like, n=noise[-1]: n.to(like.device, torch.float32)
        refined_ours = ours.refine(image.clone(), [0.0], [0.0], [0.0], strength=strength, steps=50)
        del ours.draw_noise
        results[f"refine_image_rel_strength{strength}"] = rel(refined_ours, refined_dg.float())
        results[f"refine_image_shape"] = list(refined_ours.shape)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd-utils", help="DreamGaussian's guidance/sd_utils.py")
    parser.add_argument("--dreamgaussian", help="a checkout or bare git directory of dreamgaussian/dreamgaussian")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    if not args.sd_utils and not args.dreamgaussian:
        parser.error("pass --sd-utils or --dreamgaussian")
    from hash3d_dg.guidance.tiny_sd import write_tiny_sd_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        module, source = load_sd_utils(args.sd_utils, args.dreamgaussian, Path(tmp))
        ckpt = write_tiny_sd_checkpoint(Path(tmp) / "tiny-sd", seed=args.seed, variant=None)
        results = run_parity(module, ckpt, seed=args.seed)
    report = {
        "what": "hash3d-dg StableDiffusionGuidance vs DreamGaussian's guidance/sd_utils.py StableDiffusion "
                "(fetched, never committed), same tiny random SD checkpoint (write_tiny_sd_checkpoint, "
                "plain-named fp16 weights loaded as fp32, CPU), prompt, negative prompt, image, timestep and noise",
        "dreamgaussian": source,
        "notes": [
            "max relative difference = max|ours - DG| / max|DG|",
            "guidance scale 100 (DreamGaussian's train_step and refine defaults), renders resized to 512 px",
            "the VAE posterior sample is the first draw of each side's generator, both seeded alike; "
            "DreamGaussian's torch.randn_like noise is recorded and handed to ours",
            "DreamGaussian divides the SDS loss by the batch size; batch 1 here",
        ],
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
