"""The run configuration: YAML + key=value overrides, validated with one-line errors."""

import pytest

from hash3d_dg.config import CONFIG_DIR, build_config, config_keys, load_config, parse_override
from hash3d_dg.errors import ConfigError


def test_default_config_is_dreamgaussian_with_hash3d_off():
    cfg = load_config(CONFIG_DIR / "image.yaml")
    assert cfg.stage1.iters == 500 and cfg.stage2.iters == 50
    assert cfg.stage1.num_pts == 5000 and cfg.stage1.render_res == [128, 256, 512]
    assert cfg.guidance.model == "ashawkey/stable-zero123-diffusers"
    assert cfg.guidance.guidance_scale == 5.0
    assert cfg.hash3d.mode == "off"


def test_hash3d_config_selects_paper_preset():
    cfg = load_config("image_hash3d")
    assert cfg.hash3d.mode == "paper"
    assert cfg.hash3d.eta == pytest.approx(0.1)
    assert len(cfg.hash3d.grids) == 3 and cfg.hash3d.adaptive


def test_overrides_are_typed_and_resolved():
    cfg = load_config("image.yaml", ["stage1.iters=300", "seed=7", "hash3d.mode=official",
                                     "hash3d.eta=0.25", "num_pts=100", "stage1.render_res=[64,64,64]"])
    assert cfg.stage1.iters == 300 and isinstance(cfg.stage1.iters, int)
    assert cfg.seed == 7 and cfg.stage1.num_pts == 100
    assert cfg.stage1.render_res == [64, 64, 64]
    assert cfg.hash3d.mode == "official" and cfg.hash3d.eta == pytest.approx(0.25)
    assert len(cfg.hash3d.grids) == 1 and not cfg.hash3d.adaptive


def test_mode_off_written_bare_is_not_a_boolean():
    assert parse_override("hash3d.mode=off") == ("hash3d.mode", "off")
    cfg = load_config("image_hash3d", ["hash3d.mode=off"])
    assert cfg.hash3d.mode == "off"


@pytest.mark.parametrize("override, words", [
    ("stage1.nonsense=1", "unknown config key"),
    ("bogus=1", "unknown config key"),
    ("iters=3", "ambiguous"),
    ("stage1.iters=abc", "expects an integer"),
    ("stage1.iters=2.5", "expects an integer"),
    ("stage1.invert_bg_prob=yes please", "expects a number"),
    ("stage1.anneal_timestep=3", "expects true or false"),
    ("elevation=95", "elevation"),
    ("hash3d.mode=fancy", "hash3d"),
    ("hash3d.eta=1.5", "hash3d"),
    ("noequals", "key=value"),
])
def test_bad_overrides_give_one_line_errors(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("image.yaml", [override])
    message = str(info.value)
    assert words in message and "\n" not in message


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    wrong_section = tmp_path / "wrong.yaml"
    wrong_section.write_text("stage1:\n  itres: 3\n")
    with pytest.raises(ConfigError, match="stage1.itres"):
        load_config(wrong_section)


def test_every_shipped_config_loads():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        build_config(__import__("yaml").safe_load(path.read_text()))


def test_config_keys_lists_every_section():
    keys = config_keys()
    for prefix in ("seed=", "stage1.iters=", "stage2.iters=", "mesh.resolution=", "hash3d.eta=",
                   "guidance.model="):
        assert any(k.startswith(prefix) for k in keys)


# ------------------------------------------------------------------ numbers as people type them

@pytest.mark.parametrize("override, key, value", [
    ("stage2.geom_lr=1e-4", ("stage2", "geom_lr"), 1e-4),
    ("stage1.position_lr_init=1.0e-3", ("stage1", "position_lr_init"), 1e-3),
    ("stage1.lambda_rgb=1E4", ("stage1", "lambda_rgb"), 1e4),
    ("stage1.feature_lr=.5", ("stage1", "feature_lr"), 0.5),
    ("stage1.iters=1e3", ("stage1", "iters"), 1000),
    ("hash3d.eta=5e-2", ("hash3d", "eta"), 0.05),
    ("hash3d.memory_budget_bytes=1e9", ("hash3d", "memory_budget_bytes"), 10**9),
])
def test_scientific_notation_in_overrides(override, key, value):
    cfg = load_config("image_hash3d", [override])
    got = getattr(getattr(cfg, key[0]), key[1])
    assert got == pytest.approx(value) and type(got) is type(value)


def test_scientific_notation_in_yaml_files(tmp_path):
    path = tmp_path / "sci.yaml"
    path.write_text("stage1:\n  position_lr_init: 1.0e-3\n  position_lr_final: 2e-5\n  iters: 3e2\n"
                    "  render_res: [6.4e1, 128, 2.56e2]\nstage2:\n  geom_lr: 1e-4\n"
                    "hash3d:\n  mode: paper\n  grids: [[1e1, 10, 1e-1, 10]]\n")
    cfg = load_config(path)
    assert cfg.stage1.position_lr_init == pytest.approx(1e-3)
    assert cfg.stage1.position_lr_final == pytest.approx(2e-5)
    assert cfg.stage1.iters == 300 and cfg.stage2.geom_lr == pytest.approx(1e-4)
    assert cfg.stage1.render_res == [64.0, 128, 256.0]
    assert cfg.hash3d.grids == [[10.0, 10.0, 0.1, 10.0]]


@pytest.mark.parametrize("override, words", [
    ("elevation=95", ["elevation=95.0", "(-90, 90)"]),
    ("elevation=-90", ["elevation=-90.0", "(-90, 90)"]),
    ("stage1.iters=-3", ["stage1.iters=-3", ">= 0"]),
    ("stage2.iters=-1", ["stage2.iters=-1", ">= 0"]),
    ("stage1.ref_size=0", ["stage1.ref_size=0", ">= 16"]),
    ("mesh.texture_size=-8", ["mesh.texture_size=-8", ">= 8"]),
    ("radius=0", ["radius=0.0", "> 0"]),
    ("stage2.render_res=0", ["stage2.render_res=0", ">= 8"]),
    ("stage1.render_res=[64,0,64]", ["stage1.render_res[1]=0", ">= 8"]),
    ("stage2.geom_lr=-1e-4", ["stage2.geom_lr=-0.0001", ">= 0"]),
    ("seed=-1", ["seed=-1", "[0, 4294967295]"]),
    ("stage1.lambda_rgb=nan", ["finite"]),
    ("stage1.feature_lr=inf", ["finite"]),
])
def test_out_of_range_numbers_name_value_and_range(override, words):
    with pytest.raises(ConfigError) as info:
        load_config("image.yaml", [override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_mesh_choices_are_checked_before_any_stage_and_match_the_baker():
    from hash3d_dg.config import MESH_BAKE_MODES, MESH_BAKE_VIEWS
    from hash3d_dg.mesh.bake import BAKE_MODES, BAKE_VIEW_SETS

    assert tuple(MESH_BAKE_MODES) == tuple(BAKE_MODES)
    assert tuple(MESH_BAKE_VIEWS) == tuple(BAKE_VIEW_SETS)
    for override in ("mesh.bake_mode=sharp", "mesh.box_fill=1.5", "mesh.clean=none"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        assert override.split("=")[0] in str(err.value) and "\n" not in str(err.value)
