"""The pure-PyTorch paths on a CUDA device, checked against the same code on the CPU, and the
guidance in bfloat16 on the GPU (all ``cuda``-marked: skipped without CUDA; `bench gpu` runs them)."""

from __future__ import annotations

import pytest
import torch
import trimesh

from hash3d_dg.camera import Camera
from hash3d_dg.gaussians import rasterize_gaussians
from hash3d_dg.mesh.backends import rasterize_mesh
from hash3d_dg.mesh.mesh import Mesh


def _scene(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 3, generator=g) * 2 - 1) * 0.5, torch.randn(n, 4, generator=g),
            0.01 + torch.rand(n, 3, generator=g) * 0.05, 0.05 + 0.9 * torch.rand(n, generator=g),
            torch.rand(n, 3, generator=g)]


@pytest.mark.cuda
def test_torch_gaussian_backend_on_cuda_matches_cpu():
    cam = Camera.orbit(-15, 40, 2.0, 72, 64)
    outs = {}
    for device in ("cpu", "cuda"):
        scene = [t.to(device) for t in _scene()]
        means = scene[0].clone().requires_grad_()
        o = rasterize_gaussians(means, *scene[1:], camera=cam,
                                background=torch.ones(3, device=device), backend="torch")
        (o.image.sum() + o.alpha.sum()).backward()
        outs[device] = (o, means.grad)
    (a, ga), (b, gb) = outs["cpu"], outs["cuda"]
    assert b.backend == "torch" and b.image.device.type == "cuda"
    for name in ("image", "alpha", "depth"):
        torch.testing.assert_close(getattr(b, name).cpu(), getattr(a, name), rtol=1e-4, atol=1e-5)
    assert torch.equal(b.radii.cpu(), a.radii)
    # gradients: summed with atomics on the GPU, so compared relative to their scale
    for got, ref in ((b.means2d.grad, a.means2d.grad), (gb, ga)):
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.cuda
def test_torch_mesh_rasterizer_on_cuda_matches_cpu():
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=3, radius=0.6))
    mesh = mesh.unwrap_uv(texture_size=64)
    texture = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
    cam = Camera.orbit(-20.0, 30.0, 2.0, width=96, height=80)
    outs = {}
    for device in ("cpu", "cuda"):
        m = mesh.to(device)
        # a fresh leaf per device: on the CPU ``.to("cpu")`` returns ``texture`` itself, so
        # ``requires_grad_()`` on it would make the CUDA copy a non-leaf without ``.grad``
        tex = texture.detach().to(device).clone().requires_grad_()
        o = rasterize_mesh(m, cam, backend="torch", background=torch.ones(3, device=device),
                           albedo=tex, antialias=True)
        o.rgb.sum().backward()
        outs[device] = (o, tex.grad)
    (a, ga), (b, gb) = outs["cpu"], outs["cuda"]
    assert b.rgb.device.type == "cuda"
    assert float((a.tri_id == b.tri_id.cpu()).float().mean()) > 0.999
    torch.testing.assert_close(b.rgb.cpu(), a.rgb, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb.cpu(), ga, rtol=1e-3, atol=1e-4 * float(ga.abs().max()))


@pytest.mark.cuda
def test_guidance_in_bfloat16_on_cuda(tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    from hash3d_dg.guidance import Zero123Guidance, load_zero123, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "tiny-stable-zero123-diffusers")
    comp = load_zero123(str(ckpt), device="cuda", dtype=torch.bfloat16)
    guidance = Zero123Guidance(comp, image_size=64)
    guidance.set_reference(torch.rand(1, 3, 64, 64, device="cuda"), 0.0)
    renders = torch.rand(2, 3, 48, 48, device="cuda", requires_grad=True)
    loss = guidance.sds(renders, [0.0, 10.0], [30.0, -90.0], [0.0, 0.0], step_ratio=0.5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert renders.grad.dtype == torch.float32 and torch.isfinite(renders.grad).all()
    out = guidance.refine(renders.detach(), [0.0, 10.0], [30.0, -90.0], [0.0, 0.0])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
