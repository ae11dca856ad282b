"""Mutation testing of the method's modules with mutmut 3, one module at a time.

mutmut 3 reads its settings from ``[tool.mutmut]`` in ``pyproject.toml`` of the directory it
runs in and writes a ``mutants/`` tree there. So that neither the checkout nor its
``pyproject.toml`` is touched, each run happens in a scratch copy of a commit (``git archive``)
whose ``pyproject.toml`` gets the module's section: the files to mutate (``only_mutate``) and the
test files that guard them (``pytest_add_cli_args_test_selection``). mutmut runs, for each
mutant, only the selected tests that execute the mutated function (its own coverage stats).

Usage (from the repository root, with mutmut 3.8.1 installed; nice'd, one child at a time)::

    python tools/mutation.py run cache --phase after            # HEAD's tests
    python tools/mutation.py run stages --phase before --commit 09490c0
    python tools/mutation.py summary                            # -> benchmarks/results/mutation.json

``run`` stores the module's verdicts in ``benchmarks/results/mutation/<module>_<phase>.json``;
``summary`` merges them, applies the equivalent-mutant list (``EQUIVALENT``, each with its
reason) and writes the kill rate per module, before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = RESULTS / "mutation"

# module -> files to mutate, test files before issue 21, test files after
MODULES: dict[str, dict] = {
    "cache": {
        "mutate": ["hash3d_dg/cache/grid.py", "hash3d_dg/cache/table.py", "hash3d_dg/cache/blend.py"],
        # the hypothesis properties (tests/test_cache_properties.py) are left out: too slow
        # to repeat per mutant on 2 shared cores; the rates are lower bounds of the suite's
        "before": ["tests/test_cache_table.py"],
        "after": ["tests/test_cache_table.py", "tests/test_wiring_cache.py"],
    },
    "unet_split": {
        "mutate": ["hash3d_dg/guidance/unet_split.py"],
        "before": ["tests/test_unet_split.py"],
        "after": ["tests/test_unet_split.py", "tests/test_wiring_unet_split.py"],
    },
    "guidance": {  # the SDS and refine of Zero123Guidance (and what they call in zero123.py)
        "mutate": ["hash3d_dg/guidance/zero123.py"],
        "before": ["tests/test_guidance_sds.py", "tests/test_bf16.py",
                   "tests/test_guidance_tiny_vae.py"],
        "after": ["tests/test_guidance_sds.py", "tests/test_bf16.py",
                  "tests/test_guidance_tiny_vae.py", "tests/test_wiring_refine.py",
                  "tests/test_wiring_guidance.py"],
    },
    "stage1": {
        "mutate": ["hash3d_dg/stages/stage1.py"],
        "before": ["tests/test_stages.py", "tests/test_gaussians_fit.py"],
        # the new reference-loop tests and the fast divergence tests of test_stages.py
        "after": ["tests/test_wiring_stage1.py",
                  "tests/test_stages.py::test_stage1_stops_at_a_non_finite_loss",
                  "tests/test_stages.py::test_stage1_stops_at_a_non_finite_render_before_touching_the_gaussians",
                  "tests/test_stages.py::test_stage1_off_mode_never_touches_a_cache"],
    },
    "stage2": {
        "mutate": ["hash3d_dg/stages/stage2.py"],
        "before": ["tests/test_stages.py"],
        "after": ["tests/test_wiring_stage2.py",
                  "tests/test_stages.py::test_stage2_stops_at_a_non_finite_render",
                  "tests/test_stages.py::test_stage2_fits_the_reference_texture_without_guidance"],
    },
    "export": {
        "mutate": ["hash3d_dg/mesh/export.py"],
        "before": ["tests/test_mesh_export.py"],
        "after": ["tests/test_mesh_export.py", "tests/test_wiring_export.py"],
    },
    "step_graph": {  # the fused SDS and refine steps (round 4), and the denoiser's decide/done
        "mutate": ["hash3d_dg/guidance/step_graph.py"],
        "before": ["tests/test_graphed.py"],
        "after": ["tests/test_graphed.py", "tests/test_text_guidance.py::test_fused_steps_of_a_v_prediction_model_are_bitwise_the_eager_steps"],
    },
    "gpu_glue": {
        "mutate": ["hash3d_dg/gaussians/rasterize_cuda.py", "hash3d_dg/mesh/rasterize_nvdiffrast.py"],
        "before": ["tests/test_gaussians_raster.py", "tests/test_mesh_raster.py"],
        "after": ["tests/test_wiring_gpu_glue.py"],
    },
}

# Mutants judged equivalent (no behaviour change a test could see), by mutmut name -> reason.
# A reason starting with "CPU:" marks a mutant equivalent on a CPU-only machine only (a
# device=None default is the CPU; an omitted backend resolves to "torch" there): summary counts
# those apart, and a CUDA run of the suite is what could kill them.
_S1 = "hash3d_dg.stages.stage1.x_run_stage1__mutmut_"
_S1E = "hash3d_dg.stages.stage1.x_evaluate_reference__mutmut_"
_CPU_DEVICE = "CPU: device=None is the CPU, where the tests run"
EQUIVALENT: dict[str, str] = {
    **{_S1E + n: _CPU_DEVICE for n in ("9", "11")},
    **{_S1 + n: _CPU_DEVICE for n in ("12", "16", "53", "55", "93", "200", "202")},
    **{_S1 + n: "tqdm's dynamic_ncols only follows the terminal width" for n in ("71", "75", "86")},
    _S1 + "90": 'float("NAN") is float("nan")',
    _S1 + "105": "min(2.0, step / iters) == min(1.0, step / iters) for step <= iters",
    _S1 + "124": "delay_mult is unused with delay_steps = 0 (DreamGaussian's schedule)",
    _S1 + "187": "sample_novel_view's d_radius is always 0",
    _S1 + "191": "rng.random() < p vs <= p differ with probability 0",
    **{_S1 + n: "every parameter gets a gradient every step, and parameters created by "
                "densification start without one: zeroing equals setting to None"
       for n in ("249", "250")},
    **{_S1 + n: "step_post_backward always returns every count key" for n in ("264", "266", "267")},
    **{_S1 + n: "the optimizer is not used after the final prune" for n in ("291", "295")},
    **{_S1 + n: "the stage's Densifier has min_opacity = 0.01 (the default), which prune() "
                "uses when none is passed" for n in ("292", "296")},
}
_SG = "hash3d_dg.guidance.step_graph.xǁSDSStepGraphǁ"
_RG = "hash3d_dg.guidance.step_graph.xǁRefineStepGraphǁ"
_CPU_CAPTURE = "CPU: capture is False on the CPU (no graph, no pool, 0 capture seconds); a CUDA run checks it"
_PATH_NAME = "a path's name is its key and 'shallow' or not: any other name than 'shallow' is the full path"
_SHAPE_KEY = ("the shape key only tells trajectory steps of one refine call apart (SDS has no "
              "trajectory) and every step of a call passes the same one")
_UNUSED_AFTER_SHALLOW = "done() after a shallow step reads neither the query nor the shape"
_SAME_DEVICE = "the table's features live on the device of the step already"
_FLOAT32 = "the scheduler's alphas are float32 and the host lists ints: the dtype/device given is what they have"
for _G in (_SG, _RG):
    EQUIVALENT.update({
        **{_G + f"__init____mutmut_{n}": _CPU_CAPTURE for n in ("1", "2", "4", "5")},
        **{_G + f"stats__mutmut_{n}": _CPU_CAPTURE for n in ("8", "9", "10", "11")},
    })
EQUIVALENT.update({
    **{_SG + f"__init____mutmut_{n}": _CPU_CAPTURE for n in ("8",)},
    **{_RG + f"__init____mutmut_{n}": _CPU_CAPTURE for n in ("9",)},
    **{_SG + f"_path__mutmut_{n}": _CPU_CAPTURE for n in ("13", "14", "17", "18", "29", "30")},
    **{_RG + f"_path__mutmut_{n}": _CPU_CAPTURE for n in ("13", "14", "17", "18", "31", "32")},
    **{_SG + f"__call____mutmut_{n}": _PATH_NAME for n in ("83", "89", "90")},
    **{_RG + f"__call____mutmut_{n}": _PATH_NAME for n in ("48", "56", "57")},
    **{_SG + f"__call____mutmut_{n}": _SHAPE_KEY for n in ("44", "46", "47", "52", "93")},
    **{_RG + f"__call____mutmut_{n}": _SHAPE_KEY for n in ("7", "9", "10")},
    **{_SG + f"__call____mutmut_{n}": _UNUSED_AFTER_SHALLOW for n in ("75", "76")},
    **{_RG + f"__call____mutmut_{n}": _UNUSED_AFTER_SHALLOW for n in ("40", "41")},
    _SG + "__call____mutmut_63": _SAME_DEVICE, _RG + "__call____mutmut_26": _SAME_DEVICE,
    _SG + "__call____mutmut_26": _FLOAT32, _RG + "indices__mutmut_14": _FLOAT32,
    **{_RG + f"alphas__mutmut_{n}": _FLOAT32 for n in ("6", "7", "8", "9", "14", "16", "21", "24")},
})
_S2 = "hash3d_dg.stages.stage2.x_run_stage2__mutmut_"
_RS = "hash3d_dg.stages.stage2.x_render_supersampled__mutmut_"
EQUIVALENT.update({
    **{_RS + n: _CPU_DEVICE for n in ("34", "37")},
    **{_S2 + n: _CPU_DEVICE for n in ("9", "33", "35", "73")},
    **{_RS + n: "F.interpolate treats align_corners=None as False for bilinear" for n in ("67", "72")},
    **{_S2 + n: "F.interpolate treats align_corners=None as False for bilinear" for n in ("237", "241")},
    _RS + "86": "the resampling (and its antialias flag) only runs when inner != size",
    _RS + "95": "stacked has 5 channels: 4:6 is 4:5",
    _S2 + "242": "image is 4-D: shape[+2:] is shape[-2:]",
    **{_S2 + n: "tqdm's dynamic_ncols only follows the terminal width" for n in ("51", "55", "66")},
    _S2 + "70": 'float("NAN") is float("nan")',
    _S2 + "88": "min(2.0, step / iters) == min(1.0, step / iters) for step <= iters",
    _S2 + "134": "uncovered pixels have a zero normal, so viewcos > 0.5 already excludes them",
    _S2 + "136": "viewcos == 0.5 exactly has probability 0",
    **{_S2 + n: "the camera is resized to the supersampled size before rendering: its own "
                "width is never used" for n in ("158", "163")},
    _S2 + "166": "sample_novel_view's d_radius is always 0",
    **{_S2 + n: "every parameter gets a gradient every step: zeroing equals setting to None"
       for n in ("268", "269")},
})
_Z = "hash3d_dg.guidance.zero123.x"
_ZG = _Z + "ǁZero123Guidanceǁ"
EQUIVALENT.update({
    **{_ZG + "__init____mutmut_" + n: _CPU_DEVICE for n in ("41", "43", "51")},
    _ZG + "__init____mutmut_14": "CachedDenoiser's cache defaults to None",
    **{_ZG + "_resize__mutmut_" + n: _CPU_DEVICE for n in ("10", "12")},
    **{_ZG + "_resize__mutmut_" + n: "every caller casts the resized images to the model dtype "
                                      "right after (encode_images, set_reference)" for n in ("11", "13")},
    _ZG + "_resize__mutmut_14": "images is 4-D: shape[+2:] is shape[-2:]",
    _ZG + "_resize__mutmut_15": "a bilinear resize to the same size is the identity",
    **{_ZG + "_resize__mutmut_" + n: "F.interpolate treats align_corners=None as False for bilinear"
       for n in ("21", "25")},
    **{_ZG + "camera_embedding__mutmut_" + n: _CPU_DEVICE for n in ("40", "42")},
    _ZG + "camera_embedding__mutmut_51": "stacking 1-D tensors on dim +1 is dim -1",
    **{_ZG + "sds_latents__mutmut_" + n: _CPU_DEVICE for n in ("9", "13", "16", "18", "23", "27")},
    **{_ZG + "sds_latents__mutmut_" + n: "torch.randn's default dtype is float32"
       for n in ("10", "14")},
    **{_ZG + "sds_latents__mutmut_" + n: "torch.full of an int fills int64 (long) by default"
       for n in ("24", "28")},
    _ZG + "sds_latents__mutmut_43": "both conditioning tensors have 2B rows",
    **{_ZG + "timestep_for__mutmut_" + n: _CPU_DEVICE for n in ("7", "12")},
    **{_Z + "__as_float64__mutmut_" + n: _CPU_DEVICE for n in ("3", "5")},
    _Z + "__as_float64__mutmut_19": "numpy reads any negative size in reshape as the unknown one",
    **{_ZG + "__init____mutmut_" + n: "the scheduler's alphas_cumprod is float32 already"
       for n in ("42", "44")},
    **{_ZG + "camera_embedding__mutmut_" + n: "the name only appears in a batch-size error, and "
                                              "d_elevation sets the batch (no check)"
       for n in ("3", "6", "7")},
    **{_ZG + "encode_images__mutmut_" + n: "CPU: the tiny autoencoder and the model are both "
                                           "float32 on the CPU (a reduced-precision GPU run "
                                           "could see the missing cast)" for n in ("10", "12")},
    _ZG + "sds_latents__mutmut_50": "both conditioning tensors have 2B rows",
})
_BLD = ("type promotion: the difference of a float16/bfloat16 and a float32 (or float64) "
        "tensor is computed in the wider dtype anyway")
EQUIVALENT.update({
    **{"hash3d_dg.cache.blend.x_query_distances__mutmut_" + n: _BLD for n in ("12", "15", "17")},
    "hash3d_dg.cache.table.xǁHash3DCacheǁ_best_of__mutmut_2": "None or a bool is that bool; "
        "an all-empty search returns a falsy flag either way",
})
_E = "hash3d_dg.mesh.export.x_"
EQUIVALENT.update({
    _E + "_atomic_write__mutmut_4": "os.umask(1) returns the previous mask like os.umask(0), "
                                     "and the next line restores it",
    _E + "export_glb__mutmut_12": "trimesh lower-cases file_type",
    **{_E + "export_obj__mutmut_" + n: "PIL infers mode RGB from a uint8 H x W x 3 array"
       for n in ("21", "23")},
    _E + "export_obj__mutmut_28": "PIL's format names are case-insensitive",
    _E + "export_obj__mutmut_33": "files is empty before: += and = agree",
    _E + "load_mesh__mutmut_28": "trimesh.util.concatenate of one geometry returns its copy",
})
_C = "hash3d_dg.cache.table.xǁHash3DCacheǁ"
_BL = "hash3d_dg.cache.blend.x_"
EQUIVALENT.update({
    **{_BL + n: _CPU_DEVICE for n in ("cosine__mutmut_16", "cosine__mutmut_18",
                                      "query_distances__mutmut_14", "query_distances__mutmut_16")},
    _BL + "blend_features__mutmut_17": "the weights are float32 or float64 like the features "
                                       "they multiply (type promotion gives the same product)",
    _BL + "cosine__mutmut_11": "eps only matters for a zero vector, where both give 0",
    "hash3d_dg.cache.table.x_view_angle_deg__mutmut_7": "negating y in both directions is a "
                                                        "reflection: angles are unchanged",
    _C + "_best_of__mutmut_10": "no caller passes a None cell",
    **{_C + "_best_of__mutmut_" + n: "the similarity is only compared between ranks whose first "
                                     "element (measured or not) is equal: both None or both floats"
       for n in ("30", "32")},
    _C + "_best_of__mutmut_36": "ranks are never equal (the last element -m differs per grid)",
    _C + "_best_of__mutmut_42": "callers test m >= 0 / m < 0 only",
    _C + "choose__mutmut_43": "callers test m >= 0 / m < 0 only",
    _C + "choose__mutmut_15": "d = 0 re-checks the query's own cells, already found empty",
    _C + "_matching__mutmut_13": "an angle exactly equal to the gate (in floating point) has "
                                 "probability 0",
    _C + "should_retrieve__mutmut_1": "random() returns exactly eta with probability 0",
})
_U = "hash3d_dg.cache.unet_split.x"
_US = _U + "ǁUNetSplitǁ"
_NATURAL = ("forwarding an up-sampler the size it produces anyway changes nothing: the mutant "
            "only forwards sizes in more cases")
EQUIVALENT.update({
    _U + "__has_attention__mutmut_13": "bool(None) is bool(False)",
    **{_US + "_check_supported__mutmut_" + n: "UNet2DConditionModel always defines "
                                              "class_embedding and encoder_hid_proj (None when unused)"
       for n in ("7", "26")},
    _US + "_down_stack_prefix__mutmut_2": "the inner loop checks len(stack) >= count before "
                                          "computing anything",
    _US + "_embed__mutmut_10": "TimestepEmbedding's condition defaults to None",
    **{_US + "_pair__mutmut_" + n: "the attention's output indexed [0] is the sample whether it "
                                   "returns a tuple or a BaseOutput" for n in ("10", "13", "14")},
    **{_US + "_upsample_size__mutmut_" + n: _NATURAL for n in ("2", "3", "4", "6", "9", "12", "13")},
    _US + "_upsample_size__mutmut_16": "every up block consumes >= 2 skips of one resolution: the "
                                       "entry below has the same size",
    _US + "full__mutmut_41": "feature is always assigned in the loop (the cache point is valid)",
    _US + "full__mutmut_78": "range(s) is range(0, s)",
})
_G = "hash3d_dg.gaussians.rasterize_cuda.x_rasterize_gsplat__mutmut_"
_I = "hash3d_dg.gaussians.rasterize_cuda.x_rasterize_inria__mutmut_"
_IP = "hash3d_dg.gaussians.rasterize_cuda.x__inria_projection_matrix__mutmut_"
_IM = "hash3d_dg.gaussians.rasterize_cuda.x_inria_matrices__mutmut_"
_N = "hash3d_dg.mesh.rasterize_nvdiffrast.x_rasterize_nvdiffrast__mutmut_"
_DIM = "dim=+1 is dim=-1 on a 2-D tensor"
EQUIVALENT.update({
    **{_G + n: _DIM for n in ("56", "72")},
    **{_I + n: _DIM for n in ("132", "141", "190")},
    _N + "27": _DIM,
    _G + "2": "the far plane 1e10 + 1 instead of 1e10 culls nothing more in any scene",
    _G + "55": "gsplat's radii are >= 2 after its 0.3 dilation (3.33 sqrt(0.3) > 1), so > 1 is > 0",
    _G + "155": "rgbd has 4 channels: 3:5 is 3:4",
    _N + "74": "clip has 4 columns: 3:5 is 3:4",
    _I + "107": "delta is zero and only means2d's own gradient is read: + and - delta agree",
    **{_I + n: "the 3DGS rasterizer takes float32 only: means2d's dtype is the default float32"
       for n in ("110", "113")},
    **{_I + n: "GaussianRasterizer.forward's shs and cov3D_precomp default to None"
       for n in ("160", "164")},
    _I + "265": "the 3DGS rasterizer returns int32 radii already",
    **{_IP + n: "the device default is never used (the only caller passes one)" for n in ("1", "2")},
    **{_IP + n: _CPU_DEVICE for n in ("7", "11")},
    **{_IM + n: _CPU_DEVICE for n in ("21", "26")},
    **{_I + n: _CPU_DEVICE for n in ("16", "56", "58", "59", "61", "111", "114", "196", "198")},
    **{_N + n: _CPU_DEVICE for n in ("14", "16")},
})


def _export(commit: str, dest: Path) -> None:
    data = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                          capture_output=True).stdout
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(dest, filter="data")


def _section(spec: dict, tests: list[str]) -> str:
    def arr(values):
        return "[" + ", ".join(json.dumps(v) for v in values) + "]"

    return ("\n[tool.mutmut]\n"
            'source_paths = ["hash3d_dg"]\n'
            f"only_mutate = {arr(spec['mutate'])}\n"
            f"pytest_add_cli_args_test_selection = {arr(tests)}\n"
            'pytest_add_cli_args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]\n'
            "do_not_mutate_patterns = ['^\\s*(log|logger)\\.(debug|info|warning)\\(']\n"
            "timeout_multiplier = 5.0\n"
            "timeout_constant = 20.0\n"
            'process_isolation = "fork"\n')


def _meta_results(work: Path) -> dict[str, int | None]:
    """mutant name -> exit code, from mutmut's ``mutants/**/*.meta`` files."""
    out = {}
    for meta in (work / "mutants").rglob("*.meta"):
        data = json.loads(meta.read_text())
        out.update(data.get("exit_code_by_key", {}))
    return out


def _status(code) -> str:
    # mutmut 3: 0 survived, 1 killed, None not checked, 33 no tests, 34 skipped,
    # 36/24/152/255 timeout-ish, -11/-9 segfault/kill
    if code is None:
        return "not_checked"
    if code == 0:
        return "survived"
    if code == 33:
        return "no_tests"
    if code == 34:
        return "skipped"
    if code in (24, 36, 152, 255, -24):
        return "timeout"
    return "killed"


def run(module: str, phase: str, commit: str | None, keep: bool, max_children: int,
        budget: float = 1800.0) -> dict:
    spec = MODULES[module]
    tests = spec[phase]
    work = Path(tempfile.mkdtemp(prefix=f"mutation_{module}_{phase}_"))
    commit = commit or "HEAD"
    _export(commit, work)
    tests = [t for t in tests if (work / t.split("::")[0]).exists()]
    with open(work / "pyproject.toml", "a") as fh:
        fh.write(_section(spec, tests))
    mutmut = shutil.which("mutmut") or "mutmut"
    cmd = ["nice", "-n", "10", mutmut, "run", "--max-children", str(max_children)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.time()
    log = open(work / "mutmut.log", "w+")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:  # keep what was decided; the rest counts as not checked
        timed_out = True
        os.killpg(proc.pid, 15)
        proc.wait()
    seconds = time.time() - start
    log.seek(0)
    log_text = log.read()
    log.close()
    codes = _meta_results(work)
    verdicts = {name: _status(code) for name, code in sorted(codes.items())}
    counts: dict[str, int] = {}
    for v in verdicts.values():
        counts[v] = counts.get(v, 0) + 1
    record = {"module": module, "phase": phase, "commit": _rev(commit), "files": spec["mutate"],
              "tests": tests, "command": " ".join(cmd[3:]), "seconds": round(seconds, 1),
              "returncode": proc.returncode, "timed_out": timed_out, "budget_s": budget,
              "counts": counts, "verdicts": verdicts, "log_tail": log_text[-3000:]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{module}_{phase}.json").write_text(json.dumps(record, indent=1) + "\n")
    if keep:
        print("scratch copy kept at", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: record[k] for k in ("module", "phase", "seconds", "counts")}))
    return record


def rerun(module: str, work: Path, budget: float) -> dict:
    """Re-check the survivors of a kept ``after`` run against HEAD's tests (new tests written
    for them): HEAD's ``tests/`` replaces the scratch copy's, mutmut's coverage stats are
    dropped (so the new tests are mapped to functions), and only the survivors run again."""
    record_path = OUT / f"{module}_after.json"
    record = json.loads(record_path.read_text())
    survivors = [n for n, v in record["verdicts"].items()
                 if v in ("survived", "no_tests", "not_checked") and n not in EQUIVALENT]
    shutil.rmtree(work / "tests")
    data = subprocess.run(["git", "archive", "--format=tar", "HEAD", "tests"], cwd=ROOT,
                          check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as fh:
        fh.write(data)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(work, filter="data")
    text = (work / "pyproject.toml").read_text()
    tests = [t for t in MODULES[module]["after"] if (work / t.split("::")[0]).exists()]
    text = re.sub(r"pytest_add_cli_args_test_selection = .*\n",
                  "pytest_add_cli_args_test_selection = [" + ", ".join(json.dumps(t) for t in tests) + "]\n",
                  text)
    (work / "pyproject.toml").write_text(text)
    stats = work / "mutants" / "mutmut-stats.json"
    if stats.exists():
        stats.unlink()
    mutmut = shutil.which("mutmut") or "mutmut"
    cmd = ["nice", "-n", "10", mutmut, "run", "--max-children", "1", *survivors]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.time()
    with open(work / "mutmut_rerun.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            proc.wait()
    codes = _meta_results(work)
    before = dict(record["verdicts"])
    record["verdicts"] = {name: _status(code) for name, code in sorted(codes.items())}
    record["counts"] = {}
    for v in record["verdicts"].values():
        record["counts"][v] = record["counts"].get(v, 0) + 1
    record["rerun"] = {"commit": _rev("HEAD"), "tests": tests, "mutants": len(survivors),
                       "seconds": round(time.time() - start, 1),
                       "killed_now": sorted(n for n in survivors
                                            if record["verdicts"].get(n) == "killed"
                                            and before.get(n) != "killed")}
    record["tests"] = tests
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"module": module, "counts": record["counts"],
                      "killed_now": len(record["rerun"]["killed_now"])}))
    return record


def _rev(commit: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()


def _rate(verdicts: dict[str, str]) -> dict:
    equivalent = [n for n, v in verdicts.items() if v == "survived" and n in EQUIVALENT]
    killed = sum(1 for v in verdicts.values() if v in ("killed", "timeout"))
    survived = [n for n, v in verdicts.items() if v == "survived" and n not in EQUIVALENT]
    no_tests = [n for n, v in verdicts.items() if v == "no_tests"]
    considered = killed + len(survived) + len(no_tests)
    not_checked = sum(1 for v in verdicts.values() if v == "not_checked")
    cpu_only = [n for n in equivalent if EQUIVALENT[n].startswith("CPU:")]
    return {"mutants": len(verdicts), "killed": killed, "survived": len(survived),
            "not_checked": not_checked, "equivalent_on_cpu_only": len(cpu_only),
            "no_tests": len(no_tests), "equivalent": len(equivalent),
            "kill_rate_non_equivalent": round(killed / considered, 4) if considered else None,
            "survivors": survived, "untested": no_tests, "equivalent_mutants": equivalent}


def summary() -> dict:
    modules = {}
    for path in sorted(OUT.glob("*.json")):
        rec = json.loads(path.read_text())
        entry = modules.setdefault(rec["module"], {"files": rec["files"]})
        entry[rec["phase"]] = {"commit": rec["commit"], "tests": rec["tests"],
                               "seconds": rec["seconds"], **_rate(rec["verdicts"])}
    out = {"tool": "mutmut 3.8.1", "driver": "tools/mutation.py",
           "command": "python tools/mutation.py run <module> --phase before|after "
                      "[--commit <base>] (runs: nice -n 10 mutmut run --max-children 1)",
           "kill_rate": "killed (incl. timeouts) / (killed + surviving non-equivalent + untested)",
           "equivalent": EQUIVALENT, "modules": modules}
    (RESULTS / "mutation.json").write_text(json.dumps(out, indent=1) + "\n")
    rows = ["| module | files | before (killed / non-equivalent) | after | after: surviving | equivalent |",
            "|---|---|---|---|---|---|"]
    for name, entry in modules.items():
        cells = [name, ", ".join(f.split("/")[-1] for f in entry["files"])]
        for phase in ("before", "after"):
            e = entry.get(phase)
            if e is None:
                cells.append("-")
                continue
            total = e["killed"] + e["survived"] + e["no_tests"]
            note = f" ({e['not_checked']} not reached)" if e.get("not_checked") else ""
            cells.append(f"{e['killed']} / {total} = {100 * e['kill_rate_non_equivalent']:.1f} %{note}"
                         if total else "-")
        after = entry.get("after", {})
        cells.append(str(after.get("survived", "-")))
        cells.append(str(after.get("equivalent", "-")))
        rows.append("| " + " | ".join(cells) + " |")
    (RESULTS / "mutation_table.md").write_text("\n".join(rows) + "\n")
    for name, entry in modules.items():
        line = [name]
        for phase in ("before", "after"):
            if phase in entry:
                e = entry[phase]
                line.append(f"{phase}: {e['killed']}/{e['killed'] + e['survived'] + e['no_tests']}"
                            f" = {e['kill_rate_non_equivalent']}")
        print("  ".join(line))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("module", choices=sorted(MODULES))
    r.add_argument("--phase", choices=("before", "after"), default="after")
    r.add_argument("--commit", default=None, help="commit to copy (default HEAD)")
    r.add_argument("--keep", action="store_true", help="keep the scratch copy")
    r.add_argument("--max-children", type=int, default=1)
    r.add_argument("--budget", type=float, default=1800.0,
                   help="seconds for the module's run; mutants not reached count as not checked")
    rr = sub.add_parser("rerun")
    rr.add_argument("module", choices=sorted(MODULES))
    rr.add_argument("--dir", required=True, help="the kept scratch copy of the after run")
    rr.add_argument("--budget", type=float, default=1800.0)
    sub.add_parser("summary")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args.module, args.phase, args.commit, args.keep, args.max_children, args.budget)
    elif args.cmd == "rerun":
        rerun(args.module, Path(args.dir), args.budget)
    else:
        summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
