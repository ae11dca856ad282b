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


#: Choices of the mesh bake (``mesh.bake_mode``, ``mesh.bake_views``); hash3d_dg.mesh.bake
#: implements them under these names.
MESH_BAKE_MODES = ("front", "first", "average")
MESH_BAKE_VIEWS = ("default18", "upper14")
#: Guidance implementations (``guidance.type``): the Zero-1-to-3 image guidance, the Stable
#: Diffusion text guidance (``--prompt``), or the oracle benchmark's analytic denoiser (it ignores
#: the input and knows the oracle object).
GUIDANCE_TYPES = ("zero123", "sd", "oracle")


@dataclass
class GuidanceConfig:
    type: str = "zero123"  # zero123 (image to 3D, --image) | sd (Stable Diffusion, text to 3D, --prompt) | oracle
    model: str = "ashawkey/stable-zero123-diffusers"  # hub id, local directory or builtin:tiny
    family: str = "auto"  # auto | stable | xl
    guidance_scale: float = 5.0
    image_size: int = 256  # guidance works on renders resized to this size
    lambda_zero123: float = 1.0  # weight of the guidance: SDS loss in stage 1, refine loss in stage 2 (DreamGaussian: lambda_zero123, or lambda_sd for text)
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float16 | bfloat16 | float32 (bf16: no fp16 overflow, on GPUs that have it)
    vae: str = "auto"  # renders' latents: auto (tiny for hash3d.mode=fast, else full) | full | tiny
    tiny_vae: str = "madebyollin/taesd"  # AutoencoderTiny hub id or local directory (guidance.vae=tiny)
    # GPU speed (auto: on for CUDA, off elsewhere; the eager CPU path is the reference)
    cuda_graphs: str = "auto"  # auto | on | off: replay the SDS step after the render as CUDA graphs
    channels_last: str = "auto"  # auto | on | off: UNet and autoencoders in channels_last memory format
    negative_prompt: str = ""  # guidance.type=sd: the negative prompt (CFG's unconditional text)


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
    fused_adam: str = "auto"  # auto (on for CUDA) | on | off: Adam's fused kernel


@dataclass
class MeshConfig:
    # defaults measured by `python -m hash3d_dg.bench mesh-phase` (3.1-4.9x less CPU than 128 /
    # 100k / 512 at equal re-render fidelity, benchmarks/results/mesh_phase/): the fitted box
    # makes 96 cells on the object as fine as 128 on the fixed +-1 box, 15k faces is about what
    # a 1024 texture shows (xatlas is super-linear in faces), and 192-px bake renders cost a
    # seventh of 512-px ones on CPU
    resolution: int = 96
    density_thresh: float = 1.0
    bound: float = 1.0
    decimate_target: int = 15_000
    texture_size: int = 1024
    bake_render_size: int = 192
    # map the Gaussians' bounding box (opacity > 0.005) to +-box_fill before sampling the grid
    # (DreamGaussian), so resolution is spent on the object; off: the fixed box +-bound.
    # Measured: on the oracle object vs ground truth it costs ~0.15 dB before stage 2 (the box
    # bounds the means, so a surface reaching past them can be clipped); kept as DreamGaussian's
    # scheme because nothing outside +-1 is lost; `false` restores the fixed box
    fit_box: bool = True
    box_fill: float = 0.9
    box_pad_sigma: float = 3.0  # bound each Gaussian by mean +- this many of its largest scale (0: means only, as DreamGaussian)
    # clean-up after marching cubes: pymeshlab (merge close vertices, drop small components,
    # repair non-manifold edges/vertices, as DreamGaussian) | basic (trimesh: largest component)
    clean: str = "pymeshlab"
    merge_close_pct: float = 1.0  # % of the bbox diagonal (DreamGaussian: 1)
    min_component_pct: float = 20.0  # drop components under this % of the bbox diagonal
    min_component_faces: int = 64
    keep_largest: bool = False  # also drop every component but the largest
    # bake: front = texels the input view sees at cos > bake_first_cos take its colour, the rest
    # the cosine-weighted average of every view (measured best); first = the first view (front
    # first) that sees a texel at cos > bake_first_cos wins, the rest averaged (DreamGaussian);
    # average = cosine-weighted average of every view (before)
    bake_mode: str = "front"
    bake_first_cos: float = 0.5
    bake_views: str = "default18"  # default18 | upper14 (hash3d_dg.mesh.bake.BAKE_VIEW_SETS)


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
    fused_adam: str = "auto"  # auto (on for CUDA) | on | off: Adam's fused kernel


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


def _as_number(key: str, value: Any, what: str) -> float:
    """``value`` as a float: a YAML number, or a string Python's ``float()`` reads (YAML 1.1 reads
    ``1e-4`` and ``1.0e-3`` as strings); booleans are not numbers."""
    if isinstance(value, bool):
        raise ConfigError(f"config key '{key}' expects {what}, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"config key '{key}' expects {what}, got {value!r}") from None
    else:
        raise ConfigError(f"config key '{key}' expects {what}, got {value!r}")
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"config key '{key}' expects a finite number, got {value!r}")
    return number


def _numeric_text(value: Any) -> Any:
    """An element of an untyped list: numeric text (``'1e-3'``) becomes a number, else unchanged."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    if isinstance(value, list):
        return [_numeric_text(v) for v in value]
    return value


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
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        args = typing.get_args(expected)
        if args:
            return [_coerce(key, v, args[0]) for v in value]
        return [_numeric_text(v) for v in value]
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_number(key, value, "an integer")
        if number != int(number):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(number)
    if expected is float:
        return _as_number(key, value, "a number")
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


def _in_range(key: str, value: float, low: float | None, high: float | None,
              low_open: bool = False, high_open: bool = False, unit: str = "") -> str | None:
    """None when ``low <(=) value <(=) high``, else the one-line complaint naming value and range."""
    ok = ((low is None or (value > low if low_open else value >= low))
          and (high is None or (value < high if high_open else value <= high)))
    if ok:
        return None

    def fmt(bound: float) -> str:
        return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else f"{bound:g}"

    if low is not None and high is not None:
        allowed = f"{'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
        text = f"must lie in {allowed}"
    elif low is not None:
        text = f"must be {'>' if low_open else '>='} {fmt(low)}"
    else:
        text = f"must be {'<' if high_open else '<='} {fmt(high)}"
    return f"{key}={value!r} is out of range: it {text}{unit}"


def validate(cfg: RunConfig) -> None:
    """Range checks that a type check cannot express; the message names the value and the range."""
    s1, s2, m, g, o = cfg.stage1, cfg.stage2, cfg.mesh, cfg.guidance, cfg.output
    ranges = [
        ("seed", cfg.seed, 0, 2**32 - 1, False, False, ""),
        ("elevation", cfg.elevation, -90, 90, True, True, " degrees"),
        ("radius", cfg.radius, 0, None, True, False, ""),
        ("fovy", cfg.fovy, 0, 180, True, True, " degrees"),
        ("guidance.guidance_scale", g.guidance_scale, 0, None, False, False, ""),
        ("guidance.lambda_zero123", g.lambda_zero123, 0, None, False, False, ""),
        ("stage1.iters", s1.iters, 0, None, False, False, ""),
        ("stage1.batch_size", s1.batch_size, 1, None, False, False, ""),
        ("stage1.ref_size", s1.ref_size, 16, None, False, False, " px"),
        ("stage1.num_pts", s1.num_pts, 1, None, False, False, ""),
        ("stage1.init_radius", s1.init_radius, 0, None, True, False, ""),
        ("stage1.invert_bg_prob", s1.invert_bg_prob, 0, 1, False, False, ""),
        ("stage1.min_ver", s1.min_ver, -90, 90, True, True, " degrees"),
        ("stage1.max_ver", s1.max_ver, -90, 90, True, True, " degrees"),
        ("stage1.percent_dense", s1.percent_dense, 0, None, False, False, ""),
        ("stage1.densification_interval", s1.densification_interval, 1, None, False, False, ""),
        ("stage1.opacity_reset_interval", s1.opacity_reset_interval, 1, None, False, False, ""),
        ("stage1.position_lr_max_steps", s1.position_lr_max_steps, 1, None, False, False, ""),
        ("mesh.resolution", m.resolution, 8, None, False, False, ""),
        ("mesh.bound", m.bound, 0, None, True, False, ""),
        ("mesh.decimate_target", m.decimate_target, 4, None, False, False, " faces"),
        ("mesh.texture_size", m.texture_size, 8, None, False, False, " px"),
        ("mesh.bake_render_size", m.bake_render_size, 8, None, False, False, " px"),
        ("mesh.box_fill", m.box_fill, 0, 1, True, False, ""),
        ("mesh.box_pad_sigma", m.box_pad_sigma, 0, None, False, False, ""),
        ("mesh.bake_first_cos", m.bake_first_cos, -1, 1, False, True, ""),
        ("stage2.iters", s2.iters, 0, None, False, False, ""),
        ("stage2.render_res", s2.render_res, 8, None, False, False, " px"),
        ("stage2.strength_start", s2.strength_start, 0, 1, False, True, ""),
        ("stage2.strength_end", s2.strength_end, 0, 1, False, True, ""),
        ("stage2.ddim_steps", s2.ddim_steps, 1, None, False, False, ""),
        ("stage2.ssaa_min", s2.ssaa_min, 0, None, True, False, ""),
        ("stage2.ssaa_max", s2.ssaa_max, 0, None, True, False, ""),
        ("output.turntable_frames", o.turntable_frames, 1, None, False, False, ""),
        ("output.preview_size", o.preview_size, 8, None, False, False, " px"),
        ("output.contact_sheet_views", o.contact_sheet_views, 1, None, False, False, ""),
    ]
    for lr_key in ("position_lr_init", "position_lr_final", "position_lr_delay_mult", "spatial_lr_scale",
                   "feature_lr", "opacity_lr", "scaling_lr", "rotation_lr", "lambda_rgb", "lambda_mask",
                   "densify_grad_threshold"):
        ranges.append((f"stage1.{lr_key}", getattr(s1, lr_key), 0, None, False, False, ""))
    ranges += [("stage2.texture_lr", s2.texture_lr, 0, None, False, False, ""),
               ("stage2.geom_lr", s2.geom_lr, 0, None, False, False, "")]
    for index, res in enumerate(s1.render_res):
        if isinstance(res, bool) or not isinstance(res, (int, float)):
            raise ConfigError(f"invalid config: stage1.render_res[{index}]={res!r} must be a number of pixels")
        ranges.append((f"stage1.render_res[{index}]", res, 8, None, False, False, " px"))
    for index, ms in enumerate(s1.render_res_milestones):
        if isinstance(ms, bool) or not isinstance(ms, (int, float)):
            raise ConfigError(f"invalid config: stage1.render_res_milestones[{index}]={ms!r} must be a number")
        ranges.append((f"stage1.render_res_milestones[{index}]", ms, 0, 1, False, False, ""))
    for key, value, low, high, low_open, high_open, unit in ranges:
        problem = _in_range(key, value, low, high, low_open, high_open, unit)
        if problem:
            raise ConfigError(f"invalid config: {problem}")

    choices = [
        ("matting", cfg.matting, ("auto", "alpha", "rembg", "border")),
        ("guidance.type", g.type, GUIDANCE_TYPES),
        ("guidance.family", g.family, ("auto", "stable", "xl")),
        ("guidance.dtype", g.dtype, ("auto", "float16", "bfloat16", "float32")),
        ("guidance.vae", g.vae, ("auto", "full", "tiny")),
        # The mesh choices are checked here, before stage 1, not only when meshing starts
        ("mesh.bake_mode", m.bake_mode, MESH_BAKE_MODES),
        ("mesh.bake_views", m.bake_views, MESH_BAKE_VIEWS),
        ("mesh.clean", m.clean, ("pymeshlab", "basic")),
        ("guidance.cuda_graphs", g.cuda_graphs, ("auto", "on", "off")),
        ("guidance.channels_last", g.channels_last, ("auto", "on", "off")),
        ("stage1.fused_adam", s1.fused_adam, ("auto", "on", "off")),
        ("stage2.fused_adam", s2.fused_adam, ("auto", "on", "off")),
    ]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"invalid config: {key}={value!r} must be one of {', '.join(allowed)}")
    checks = [
        (len(s1.render_res) == len(s1.render_res_milestones) + 1,
         f"stage1.render_res ({len(s1.render_res)} entries) needs one more entry than "
         f"stage1.render_res_milestones ({len(s1.render_res_milestones)})"),
        (g.image_size % 8 == 0 and g.image_size >= 32,
         f"guidance.image_size={g.image_size!r} must be a multiple of 8, at least 32"),
        (s1.min_ver <= s1.max_ver,
         f"stage1.min_ver={s1.min_ver!r} must be <= stage1.max_ver={s1.max_ver!r}"),
        (s2.ssaa_min <= s2.ssaa_max,
         f"stage2.ssaa_min={s2.ssaa_min!r} must be <= stage2.ssaa_max={s2.ssaa_max!r}"),
        (cfg.device in ("auto", "cpu") or cfg.device == "cuda"
         or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()),
         f"device={cfg.device!r} must be auto, cpu, cuda or cuda:N"),
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
