"""Text-path figures: SD 2.1 compute on the meta device, the text loop's call counts, the oracle
in text mode, and that the image path's figures did not move."""

import pytest
import torch

from hash3d_dg.bench import text_costs
from hash3d_dg.bench.macs import run_tmacs


def test_sd21_unet_cfg_pair_and_cache_points():
    unet = text_costs.sd21_unet_gmacs()
    assert 780 < unet["full"] < 830  # one CFG pair at 64x64 latents, 77 x 1024 context
    shallow = unet["shallow_by_point"]
    assert shallow["last_subblock"] < shallow["paper"] < shallow["last_block"] < unet["full"]
    vae = text_costs.sd21_vae_gmacs()
    assert vae["encode_backward"] > 0.9 * vae["encode"] > 400  # 512 px
    tiny = text_costs.taesd_text_gmacs()
    assert tiny["encode"] < vae["encode"] / 5


def test_text_call_counts_come_from_the_text_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))
    calls = text_costs.text_count_calls("paper", iters=6, iters_refine=2, size=16, eta=1.0)
    c1, c2 = calls["stage1"], calls["stage2"]
    assert c1["sds_calls"] == 6 and c1["unet_full_calls"] + c1["unet_shallow_calls"] == 6
    assert c2["refine_calls"] == 2 and c2["unet_full_calls"] + c2["unet_shallow_calls"] > 0
    per_call = {"unet_full_cfg_pair": 800.0, "unet_shallow_cfg_pair": 180.0, "vae_encode_forward": 558.0,
                "vae_encode_backward": 575.0, "vae_decode": 1257.0}
    entry = run_tmacs(per_call, calls)
    expected_s1 = (6 * (558.0 + 575.0) + c1["unet_full_calls"] * 800.0 + c1["unet_shallow_calls"] * 180.0) / 1e3
    assert entry["stage1_tmacs"] == pytest.approx(expected_s1, abs=1e-3)


def test_image_figures_did_not_move():
    from hash3d_dg.bench.flops import flops_report

    report = flops_report(256, "paper")
    assert report["unet_full_gmacs"] == pytest.approx(176.3, abs=0.05)
    assert report["unet_shallow_gmacs_by_point"]["paper"] == pytest.approx(32.6, abs=0.05)
    assert report["vae_encode_gmacs"] == pytest.approx(136.4, abs=0.05)


def test_oracle_runs_the_text_loop(tmp_path):
    from hash3d_dg.eval.oracle import oracle_report

    torch.manual_seed(0)
    report = oracle_report(iters=20, iters_refine=2, modes=("off", "paper"), sweeps=False, size="tiny", task="text")
    assert report["settings"]["task"] == "text" and "none" in report["settings"]["reference_view"]
    for mode in ("off", "paper"):
        result = report["modes"][mode]
        assert result["stage1"]["ref_psnr"] is None and result["stage2"]["ref_psnr"] is None
        assert result["unet_full_calls"] > 0 and result["psnr"] > 5.0
    assert report["modes"]["off"]["unet_shallow_calls"] == 0
