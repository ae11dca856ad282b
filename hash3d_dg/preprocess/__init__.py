"""Input images: loading, background removal (matting), re-centring on a square canvas.

The first step of the pipeline: a photo of an object becomes a ``size x size`` RGBA image whose
alpha marks the object, with the object's bounding box centred and its longer side filling
``fill`` (80%) of the canvas, as DreamGaussian and Zero-1-to-3 expect. Stage 1 matches the
reference view against :func:`composite_white` of that image plus its alpha as the mask.

Matting methods:

* ``alpha``: the image's own alpha channel (kept whenever it has real transparency);
* ``rembg``: the rembg segmentation model (imported lazily: slow first import, and it downloads
  its model on first use);
* ``border``: a fallback for photos on a plain background, estimated from the border colour.

Command line::

    python -m hash3d_dg.preprocess IMAGE_OR_DIR [--size 256] [--matting auto|alpha|rembg|border]
                                                [--fill 0.8] [--output DIR]

writes ``<stem>_rgba.png`` (8-bit RGBA) for each input image.
"""

from hash3d_dg.preprocess.command import find_images, main
from hash3d_dg.preprocess.framing import composite_white, recentre
from hash3d_dg.preprocess.io import (IMAGE_SUFFIXES, MATTING_METHODS, MIN_SIDE, REMBG_ERROR,
                                     VISIBLE_ALPHA, load_image)
from hash3d_dg.preprocess.matting import remove_background
from hash3d_dg.preprocess.prepare import PreparedImage, prepare_image

__all__ = ["IMAGE_SUFFIXES", "MATTING_METHODS", "MIN_SIDE", "REMBG_ERROR", "VISIBLE_ALPHA",
           "PreparedImage", "composite_white", "find_images", "load_image", "main",
           "prepare_image", "recentre", "remove_background"]
