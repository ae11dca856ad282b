"""One run configuration: nested dataclasses loaded from YAML plus ``key=value`` overrides.

A YAML file holds sections that mirror the dataclasses below, e.g.::

    stage1:
      iters: 500
    hash3d:
      mode: paper

Overrides use dotted keys in DreamGaussian's ``key=value`` style (``stage1.iters=300``,
``hash3d.eta=0.2``); a top-level field may also be written bare (``seed=3``), and a key that is
unique across sections may be written without its section (``iters=300``). Values are parsed as
YAML scalars. An unknown key or a value of the wrong type raises ``ConfigError`` with one line.

The ``hash3d`` section is resolved through :meth:`Hash3DConfig.preset`: its ``mode`` picks a
preset and every other key given overrides that preset's value.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hash3d_dg.cache.config import Hash3DConfig
from hash3d_dg.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
TINY_MODEL = "builtin:tiny"  # the built-in tiny random checkpoint (smoke runs, tests)


@dataclass
class GuidanceConfig:
    model: str = "ashawkey/stable-zero123-diffusers"  # hub id, local directory or builtin:tiny
    family: str = "auto"  # auto | stable | xl
    guidance_scale: float = 5.0
    image_size: int = 256  # guidance works on renders resized to this size
    lambda_zero123: float = 1.0  # weight of the SDS loss in stage 1 and the refine loss in stage 2
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float16 | float32
    vae: str = "auto"  # renders' latents: auto (tiny for hash3d.mode=fast, else full) | full | tiny
    tiny_vae: str = "madebyollin/taesd"  # AutoencoderTiny hub id or local directory (guidance.vae=tiny)


@dataclass
class Stage1Config:
    iters: int = 500
    batch_size: int = 1
    ref_size: int = 256
    num_pts: int = 5000
    init_radius: float = 0.5
    lambda_rgb: float = 10000.0
    lambda_mask: float = 1000.0
    position_lr_init: float = 1e-3
    position_lr_final: float = 2e-5
    position_lr_delay_mult: float = 0.02
    position_lr_max_steps: int = 500
    spatial_lr_scale: float = 10.0  # DreamGaussian's create_from_pcd(pcd, 10): position lr x 10
    feature_lr: float = 0.01
    opacity_lr: float = 0.05
    scaling_lr: float = 0.005
    rotation_lr: float = 0.005
    percent_dense: float = 0.01
    density_start_iter: int = 100
    density_end_iter: int = 3000
    densification_interval: int = 100
    opacity_reset_interval: int = 700
    densify_grad_threshold: float = 0.01
    render_res: list = field(default_factory=lambda: [128, 256, 512])
    render_res_milestones: list = field(default_factory=lambda: [0.3, 0.6])
    invert_bg_prob: float = 0.5
    min_ver: float = -30.0
    max_ver: float = 30.0
    anneal_timestep: bool = True
    backend: str = "auto"  # auto | torch | gsplat | inria


@dataclass
class MeshConfig:
    resolution: int = 128
    density_thresh: float = 1.0
    bound: float = 1.0
    decimate_target: int = 100_000
    texture_size: int = 1024
    bake_render_size: int = 512


@dataclass
class Stage2Config:
    iters: int = 50
    render_res: int = 512
    texture_lr: float = 0.2
    geom_lr: float = 0.0  # > 0 turns on vertex-offset training (DreamGaussian: 1e-4)
    strength_start: float = 0.8
    strength_end: float = 0.95
    ddim_steps: int = 50
    ssaa_min: float = 0.125
    ssaa_max: float = 2.0
    backend: str = "auto"  # auto | torch | nvdiffrast


@dataclass
class OutputConfig:
    turntable_frames: int = 36
    preview_size: int = 256
    contact_sheet_views: int = 8
    save_video: bool = True


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    elevation: float = 0.0  # elevation of the input view (degrees; negative looks from above)
    radius: float = 2.0
    fovy: float = 49.1
    matting: str = "auto"  # auto | alpha | rembg | border
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    hash3d: Hash3DConfig = field(default_factory=lambda: Hash3DConfig.preset("off"))
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig)
                  if f.default_factory is not dataclasses.MISSING)


def _section_fields(name: str) -> dict[str, dataclasses.Field]:
    section_cls = type(getattr(RunConfig(), name))
    return {f.name: f for f in dataclasses.fields(section_cls)}


def _top_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS}


def _expected_type(owner: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(owner)
    return hints.get(f.name, type(f.default))


def _coerce(key: str, value: Any, expected: Any) -> Any:
    origin = typing.get_origin(expected)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = typing.get_args(expected)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' has the wrong type: got {value!r}")
    if expected in (list, typing.List) or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(value)
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    return value


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix and key in _SECTIONS:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _resolve_key(key: str) -> str:
    """Full dotted name of ``key``; a bare name is looked up among the top-level fields, then
    among the sections, where it must be unique."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in _SECTIONS or name not in _section_fields(section):
            raise ConfigError(f"unknown config key '{key}' (see `python main.py --help` for the keys)")
        return key
    if key in _top_fields():
        return key
    owners = [s for s in _SECTIONS if key in _section_fields(s)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if len(owners) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: write one of "
                          + ", ".join(f"{s}.{key}" for s in owners))
    raise ConfigError(f"unknown config key '{key}' (see `python main.py --help` for the keys)")


def parse_override(text: str) -> tuple[str, Any]:
    """``'stage1.iters=300'`` -> ``('stage1.iters', 300)``."""
    if "=" not in text:
        raise ConfigError(f"config override '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads off/on/yes/no as booleans; keep the word
    return key, value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        candidate = CONFIG_DIR / path.name
        if not path.suffix and (CONFIG_DIR / f"{path.name}.yaml").is_file():
            candidate = CONFIG_DIR / f"{path.name}.yaml"
        if candidate.is_file():
            path = candidate
        else:
            raise ConfigError(f"config file '{path}' not found (configs live in {CONFIG_DIR})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys")
    return data


def build_config(values: dict[str, Any] | None = None,
                 overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """A validated ``RunConfig`` from a (nested) mapping and ``key=value`` overrides, in that order."""
    flat: dict[str, Any] = {}
    for key, value in _flatten(values or {}).items():
        flat[_resolve_key(key)] = value
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        flat[_resolve_key(key)] = value

    cfg = RunConfig()
    hash3d_values: dict[str, Any] = {}
    for key, value in flat.items():
        if "." not in key:
            f = _top_fields()[key]
            setattr(cfg, key, _coerce(key, value, _expected_type(RunConfig, f)))
            continue
        section, name = key.split(".", 1)
        if section == "hash3d":
            hash3d_values[name] = value
            continue
        target = getattr(cfg, section)
        f = _section_fields(section)[name]
        setattr(target, name, _coerce(key, value, _expected_type(type(target), f)))

    mode = hash3d_values.pop("mode", "off")
    if mode is False:  # an unquoted `mode: off` in a YAML file
        mode = "off"
    typed = {}
    for name, value in hash3d_values.items():
        f = _section_fields("hash3d")[name]
        typed[name] = _coerce(f"hash3d.{name}", value, _expected_type(Hash3DConfig, f))
    try:
        cfg.hash3d = Hash3DConfig.preset(str(mode), **typed)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"hash3d settings are invalid: {str(exc).splitlines()[0]}") from None
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    return build_config(read_yaml(path) if path is not None else {}, overrides)


def validate(cfg: RunConfig) -> None:
    """Range checks that a type check cannot express."""
    checks = [
        (cfg.stage1.iters >= 0, "stage1.iters must be >= 0"),
        (cfg.stage2.iters >= 0, "stage2.iters must be >= 0"),
        (cfg.stage1.batch_size >= 1, "stage1.batch_size must be >= 1"),
        (cfg.stage1.num_pts >= 1, "stage1.num_pts must be >= 1"),
        (cfg.stage1.ref_size >= 16, "stage1.ref_size must be >= 16"),
        (len(cfg.stage1.render_res) == len(cfg.stage1.render_res_milestones) + 1,
         "stage1.render_res needs one more entry than stage1.render_res_milestones"),
        (-90 < cfg.elevation < 90, "elevation must lie in (-90, 90) degrees"),
        (cfg.radius > 0, "radius must be > 0"),
        (0 < cfg.fovy < 180, "fovy must lie in (0, 180) degrees"),
        (cfg.matting in ("auto", "alpha", "rembg", "border"), "matting must be auto, alpha, rembg or border"),
        (cfg.guidance.family in ("auto", "stable", "xl"), "guidance.family must be auto, stable or xl"),
        (cfg.guidance.dtype in ("auto", "float16", "float32"), "guidance.dtype must be auto, float16 or float32"),
        (cfg.guidance.vae in ("auto", "full", "tiny"), "guidance.vae must be auto, full or tiny"),
        (cfg.guidance.image_size % 8 == 0 and cfg.guidance.image_size >= 32,
         "guidance.image_size must be a multiple of 8, at least 32"),
        (0.0 <= cfg.stage1.invert_bg_prob <= 1.0, "stage1.invert_bg_prob must lie in [0, 1]"),
        (cfg.stage1.min_ver <= cfg.stage1.max_ver, "stage1.min_ver must be <= stage1.max_ver"),
        (0.0 <= cfg.stage2.strength_start < 1.0 and 0.0 <= cfg.stage2.strength_end < 1.0,
         "stage2.strength_start/end must lie in [0, 1)"),
        (cfg.mesh.resolution >= 8, "mesh.resolution must be >= 8"),
        (cfg.mesh.texture_size >= 8, "mesh.texture_size must be >= 8"),
        (cfg.output.turntable_frames >= 1, "output.turntable_frames must be >= 1"),
        (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
         "device must be auto, cpu, cuda or cuda:N"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")


def config_keys() -> list[str]:
    """Every dotted key with its default, for --help."""
    defaults = RunConfig()
    keys = [f"{name}={getattr(defaults, name)!r}" for name in _top_fields()]
    for section in _SECTIONS:
        obj = getattr(defaults, section)
        keys += [f"{section}.{f.name}={getattr(obj, f.name)!r}" for f in dataclasses.fields(obj)]
    return keys
