"""Mesh stage: mesh type, extraction, uv atlas, texture baking, rasterisation and export.

Conventions (details in :mod:`hash3d_dg.mesh.mesh` and :mod:`hash3d_dg.mesh.backends`):
world frame +y up, front +z; triangles counter-clockwise seen from outside; uv v = 0 at the
texture's bottom row, albedo images stored top row first; rendered images HWC, row 0 on top.
"""

from hash3d_dg.mesh.backends import (MESH_BACKENDS, MeshRender, available_mesh_backends,
                                     rasterize_mesh, resolve_mesh_backend)
from hash3d_dg.mesh.bake import DEFAULT_BAKE_VIEWS, bake_texture
from hash3d_dg.mesh.export import export_glb, export_obj, load_mesh
from hash3d_dg.mesh.extract import extract_mesh
from hash3d_dg.mesh.mesh import Mesh, sample_texture, vertex_normals
from hash3d_dg.mesh.validate import validate_gltf

__all__ = [
    "DEFAULT_BAKE_VIEWS", "MESH_BACKENDS", "Mesh", "MeshRender", "available_mesh_backends",
    "bake_texture", "export_glb", "export_obj", "extract_mesh", "load_mesh", "rasterize_mesh",
    "resolve_mesh_backend", "sample_texture", "validate_gltf", "vertex_normals",
]
