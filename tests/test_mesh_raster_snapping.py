"""Why nvdiffrast and the torch mesh rasteriser disagree on ~1 % of pixels: nvdiffrast's CUDA
rasteriser snaps projected vertices to 1/16 pixel; emulating that snapping on the CPU with the
torch rasteriser reproduces the H200's figures (triangle ids 98.8 % equal, rgb max 0.83)."""

import torch

from hash3d_dg.bench.harness import standin_mesh
from hash3d_dg.camera import Camera
from hash3d_dg.mesh import Mesh, rasterize_mesh
from hash3d_dg.mesh.rasterize_nvdiffrast import snap_to_subpixels


def test_snapping_moves_projections_onto_the_subpixel_grid_only():
    mesh = standin_mesh(texture_size=32, subdivisions=2)
    cam = Camera.orbit(-15, 30, 2.0, 256)
    snapped = snap_to_subpixels(mesh.v, cam)
    mvp = cam.mvp(dtype=torch.float64)

    def screen(v):
        clip = torch.cat([v.double(), torch.ones_like(v[:, :1]).double()], -1) @ mvp.T
        return torch.stack([(clip[:, 0] / clip[:, 3] * 0.5 + 0.5) * 256,
                            (0.5 - clip[:, 1] / clip[:, 3] * 0.5) * 256], -1), clip[:, 3]

    (a, wa), (b, wb) = screen(mesh.v), screen(snapped)
    assert (a - b).abs().max() <= 1 / 32 + 1e-4  # at most half a sub-pixel step
    assert ((b * 16 - (b * 16).round()).abs() < 1e-3).all()  # on the grid
    assert torch.allclose(wa, wb, rtol=1e-6)  # depth unchanged


def test_subpixel_snapping_explains_the_nvdiffrast_disagreement():
    # the scene of `bench gpu`'s compare part (gpu_parts._compare_mesh)
    mesh = standin_mesh(texture_size=256, subdivisions=4)
    texture = torch.rand(256, 256, 3, generator=torch.Generator().manual_seed(3))
    cam = Camera.orbit(-15, 30, 2.0, 256)
    white = torch.ones(3)
    exact = rasterize_mesh(mesh, cam, white, backend="torch", albedo=texture)
    snapped_mesh = Mesh(v=snap_to_subpixels(mesh.v, cam), f=mesh.f, vn=mesh.vn, vt=mesh.vt,
                        ft=mesh.ft, albedo=mesh.albedo)
    snapped = rasterize_mesh(snapped_mesh, cam, white, backend="torch", albedo=texture)
    covered = (exact.tri_id >= 0) | (snapped.tri_id >= 0)
    agree = float(((exact.tri_id == snapped.tri_id) & covered).sum() / covered.sum())
    rgb = (exact.rgb - snapped.rgb).abs()
    # the H200 measured nvdiffrast against torch: 0.988 agreement, rgb max 0.83, mean 9e-5; this
    # emulation gives 0.988 and 0.86 (its mean is higher: moving the vertices also moves the
    # barycentrics, which nvdiffrast computes from the unsnapped positions)
    assert 0.97 < agree < 0.999, agree
    assert float(rgb.max()) > 0.3 and float(rgb.mean()) < 2e-3
    silhouette = (exact.tri_id >= 0) != (snapped.tri_id >= 0)
    assert silhouette.any()  # the large differences are coverage flips at the silhouette
    assert float(rgb[~silhouette].max()) < float(rgb[silhouette].max())
