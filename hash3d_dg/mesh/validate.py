"""Run the Khronos glTF validator (npm package ``gltf-validator``) through Node.js when available.

The package is looked up in ``$HASH3D_DG_NODE_CACHE`` (default ``~/.cache/hash3d-dg-node``), i.e.
``<cache>/node_modules/gltf-validator``; :func:`install_gltf_validator` puts it there with npm.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

_SCRIPT = r"""
const validator = require(process.argv[1]);
const fs = require('fs');
const data = new Uint8Array(fs.readFileSync(process.argv[2]));
validator.validateBytes(data, {maxIssues: 100})
  .then((report) => { process.stdout.write(JSON.stringify(report)); })
  .catch((err) => { console.error(String(err)); process.exit(1); });
"""


def node_cache_dir() -> Path:
    """Folder holding ``node_modules/gltf-validator``."""
    default = Path.home() / ".cache" / "hash3d-dg-node"
    return Path(os.environ.get("HASH3D_DG_NODE_CACHE", default))


def _package_dir() -> Path:
    return node_cache_dir() / "node_modules" / "gltf-validator"


def install_gltf_validator(timeout: float = 300.0) -> bool:
    """``npm install gltf-validator`` into :func:`node_cache_dir`; True when it is then present."""
    if _package_dir().is_dir():
        return True
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return False
    cache = node_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(cache),
                        "gltf-validator"], check=True, capture_output=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as err:
        logger.warning("could not install gltf-validator: %s", err)
        return False
    return _package_dir().is_dir()


def validate_gltf(path, timeout: float = 120.0) -> dict | None:
    """Validate a glTF/GLB file; the validator's JSON report, or None when it is unavailable.

    ``report["issues"]["numErrors"]`` counts errors (0 for a valid file).
    """
    node = shutil.which("node")
    package = _package_dir()
    if node is None or not package.is_dir():
        return None
    proc = subprocess.run([node, "-e", _SCRIPT, str(package), str(Path(path).resolve())],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"gltf-validator failed on {path}: {proc.stderr.strip()[:500]}")
    return json.loads(proc.stdout)
