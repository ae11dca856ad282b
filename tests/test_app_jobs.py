"""The web app's jobs without a browser: page options become config, the model is reused."""

from __future__ import annotations

import pytest

from hash3d_dg.apps import cli
from hash3d_dg.apps.web import JobRunner, progress_text
from hash3d_dg.errors import ConfigError


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    runner = JobRunner("configs/smoke.yaml", ["stage1.num_pts=500"], tmp_path_factory.mktemp("jobs"))
    runner.load()
    return runner


def test_page_options_become_the_job_config(runner):
    d = runner.defaults()
    assert d == {"hash3d_mode": "paper", "stage1_iters": 2, "stage2_iters": 2, "elevation": 0.0, "seed": 0,
                 "remove_background": True}
    cfg = runner.job_config("official", 7, 3, -15, 4, False)
    assert (cfg.hash3d.mode, cfg.stage1.iters, cfg.stage2.iters, cfg.elevation, cfg.seed, cfg.matting) == (
        "official", 7, 3, -15.0, 4, "alpha")
    assert cfg.stage1.num_pts == 500  # the server's own overrides still apply
    assert runner.job_config("off", 2, 2, 0, 0, True).matting == "auto"
    with pytest.raises(ConfigError):
        runner.job_config("fastest", 2, 2, 0, 0, True)
    with pytest.raises(ConfigError, match="elevation"):
        runner.job_config("paper", 2, 2, 95, 0, True)


def test_each_job_reuses_the_loaded_model_with_a_fresh_cache(runner):
    base = runner.ctx.guidance()
    paper = runner.ctx.with_config(runner.job_config("paper", 2, 2, 0, 0, True)).guidance()
    off = runner.ctx.with_config(runner.job_config("off", 2, 2, 0, 3, True)).guidance()
    assert paper.components is base.components and off.components is base.components  # loaded once
    assert paper.denoiser.cache is not None and paper.denoiser.cache is not base.denoiser.cache
    assert paper.denoiser.cache.entries() == [] and paper.denoiser.cache.cfg.mode == "paper"
    assert off.denoiser.cache is None and off.seed == 3


def test_progress_text_names_stage_iteration_loss_and_hit_rate():
    event = {"stage": "stage1", "step": 3, "total": 10, "loss": 12.5, "hit_rate": 0.25, "cached": True}
    assert progress_text(event) == "stage 1 (gaussians): iteration 3/10, loss 12.5, cache hit rate 25%"
    assert "cache" not in progress_text({**event, "cached": False})
    assert progress_text({"stage": "mesh"}).startswith("mesh")


def test_hash3d_dg_app_subcommand_reaches_the_app(capsys):
    assert cli.main(["app", "--config", "no-such-config.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file") and "\n" not in err


@pytest.mark.parametrize("photo, start", [("ball.png", "ball-"), ("café ü_rgba.png", "café ü-"), ("写真.webp", "写真-"),
                                          ("-rf.png", "rf-"), (".hidden.png", "hidden-"), ("a\nb.png", "a-b-"),
                                          ("x" * 240 + ".png", "x" * 64 + "-"), ("???\t.png", "photo-")])
def test_job_names_are_usable_output_names(runner, photo, start, tmp_path):
    from hash3d_dg.output.names import name_problem

    name = runner.job_name(tmp_path / photo)
    assert name.startswith(start) and name_problem(name, runner.output_root) is None, name
    assert len(name) == len(start) + len("20250101-120000-abcdef")
