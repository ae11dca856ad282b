"""The run's stages, each a function of explicit inputs returning explicit outputs and its report:

image -> preprocess -> ``run_stage1`` (Gaussians) -> ``extract_textured_mesh`` -> ``run_stage2``
(mesh refine) -> export.
"""

from hash3d_dg.stages.reference import ReferenceView
from hash3d_dg.stages.stage1 import Stage1Result, run_stage1
from hash3d_dg.stages.meshing import extract_textured_mesh
from hash3d_dg.stages.stage2 import Stage2Result, run_stage2

__all__ = ["ReferenceView", "Stage1Result", "run_stage1", "extract_textured_mesh",
           "Stage2Result", "run_stage2"]
