"""The `hypir` console script: one end-to-end run through the installed script (a real process), the rest
in-process through cli.main; and hypir_config.py loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hypir import config as hypir_config

REPO = Path(__file__).resolve().parent.parent


def hypir(*args, cwd=None, env_extra=None):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.update(env_extra or {})
    hypir_bin = shutil.which("hypir", path=str(Path(sys.executable).parent)) or shutil.which("hypir")
    command = [hypir_bin] if hypir_bin else [sys.executable, "-m", "hypir"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def write_image(path: Path, mode: str, size=(40, 32)):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = (rng.random((size[1], size[0], channels)) * 255).astype(np.uint8)
    Image.fromarray(data[..., 0] if channels == 1 else data, mode).save(path)
    return path


@pytest.mark.slow
def test_bench_tiny_through_console_script(tmp_path):
    result = hypir("bench", "--model", "tiny", "--size", "128", "--repeats", "1", "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    rows = {r["backend"]: r for r in data["rows"]}
    assert {"standard", "sdpa"} <= set(rows)
    assert rows["standard"]["psnr_db"] == float("inf")
    assert rows["sdpa"]["psnr_db"] > 60 and rows["sdpa"]["error"] is None
    assert set(rows["sdpa"]["stage_ms"]) >= {"encode", "unet", "decode"}
    assert "backend" in result.stdout and "speedup" in result.stdout


@pytest.mark.slow
def test_restore_single_file_and_folder(tiny_files, tmp_path):
    folder, weights = tiny_files
    single = write_image(tmp_path / "photo.jpg", "RGB")
    result = hypir("restore", single, "-o", tmp_path / "out.png", "--base", folder, "--weights", weights,
                   "--device", "cpu", "--upscale", "2", "--tile-size", "auto")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (80, 64) and out.mode == "RGB"
    assert "FlashAttention: disabled (CPU: FlashAttention needs an NVIDIA GPU), using sdpa" in result.stdout

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "a.png", "RGBA")
    write_image(inputs / "b.png", "L", size=(20, 30))
    result = hypir("restore", inputs, "-o", tmp_path / "outdir", "--base", folder, "--weights", weights,
                   "--device", "cpu", "--long-side", "60", "--no-flash-attention", "--latent", "mode")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "outdir" / "a.png") as a, Image.open(tmp_path / "outdir" / "b.png") as b:
        assert (a.size, a.mode) == ((60, 48), "RGBA")
        assert (b.size, b.mode) == ((40, 60), "L")
    assert not list((tmp_path / "outdir").glob(".*partial"))


@pytest.mark.parametrize("args,message", [
    (["restore", "missing.png", "-o", "x.png"], "hypir: error: missing.png: no such file or folder"),
    (["restore", "{img}", "-o", "x.png", "--weights", "nothing.pth", "--base", "{base}"],
     "hypir: error: HYPIR weights not found at nothing.pth"),
    (["restore", "{img}", "-o", "x.gif", "--weights", "{weights}", "--base", "{base}"],
     "hypir: error: x.gif: the output file must end in .png, .jpg, .webp or .tif"),
])
def test_failures_are_one_line_and_non_zero(tiny_files, tmp_path, args, message, capsys, monkeypatch):
    from hypir.cli import main

    folder, weights = tiny_files
    img = write_image(tmp_path / "in.png", "RGB")
    monkeypatch.chdir(tmp_path)
    assert main([a.format(img=img, base=folder, weights=weights) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(message), err
    assert "Traceback" not in err


def test_doctor_lists_every_backend(capsys):
    from hypir.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("flash_attn ", "flash_attn3", "flash_attn4", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient",
                 "sage", "standard"):
        assert name in out
    assert "dtype auto:" in out and "HYPIR weights (HYPIR_sd2.pth)" in out


# ---- hypir_config.py -----------------------------------------------------------------------------------

def test_repo_config_is_the_file_users_edit():
    assert hypir_config.config_file() == REPO / "hypir_config.py"
    cfg = hypir_config.load_config()
    assert cfg["use_flash_attention"] is True and cfg["model_t"] == 200 and cfg["coeff_t"] == 200


def test_config_never_imported_by_bare_name(tmp_path, monkeypatch):
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "hypir_config.py").write_text("HYPIR_CONFIG = {'coeff_t': 100}\n")  # another pack's file
    monkeypatch.syspath_prepend(str(decoy))
    assert hypir_config.load_config()["coeff_t"] == 200


def test_config_file_from_environment_and_unknown_keys(tmp_path, monkeypatch):
    good = tmp_path / "mine.py"
    good.write_text("HYPIR_CONFIG = {'model_t': 150, 'use_flash_attention': False}\n")
    monkeypatch.setenv("HYPIR_CONFIG_FILE", str(good))
    cfg = hypir_config.load_config()
    assert cfg["model_t"] == 150 and cfg["use_flash_attention"] is False and cfg["coeff_t"] == 200
    bad = tmp_path / "bad.py"
    bad.write_text("HYPIR_CONFIG = {'model_T': 150}\n")
    monkeypatch.setenv("HYPIR_CONFIG_FILE", str(bad))
    with pytest.raises(ValueError, match="unknown HYPIR_CONFIG keys \\['model_T'\\]"):
        hypir_config.load_config()


def test_a_config_with_a_removed_key_still_loads(tmp_path, monkeypatch, caplog):
    """hypir_config.py files written for an earlier version keep working: torch_compile (removed) is ignored
    with a warning that says why and what to do."""
    old = tmp_path / "old.py"
    old.write_text("HYPIR_CONFIG = {'torch_compile': True, 'seed': 7}\n")
    monkeypatch.setenv("HYPIR_CONFIG_FILE", str(old))
    with caplog.at_level("WARNING", logger="hypir"):
        cfg = hypir_config.load_config()
    assert cfg["seed"] == 7 and "torch_compile" not in cfg
    assert "HYPIR_CONFIG['torch_compile'] is ignored: torch.compile was removed" in caplog.text
    assert "delete the line" in caplog.text


def test_cli_defaults_come_from_the_config(tmp_path, monkeypatch):
    from hypir.cli import build_parser

    path = tmp_path / "cfg.py"
    path.write_text("HYPIR_CONFIG = {'coeff_t': 120, 'seed': 7, 'attention': 'standard'}\n")
    monkeypatch.setenv("HYPIR_CONFIG_FILE", str(path))
    args = build_parser().parse_args(["restore", "x.png", "-o", "y.png"])
    assert (args.coeff_t, args.seed, args.attention) == (120, 7, "standard")


def test_speed_profile_sorts_kernels_by_kind():
    """The speed bench's account of GPU time, on kernel names an H100 profile of the pass showed."""
    from hypir.bench import summarize_kernels

    kernels = [
        ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1", 10.0, 24),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0", 4.0, 10),
        ("fmha_cutlassF_bf16_aligned_32x128_gmem_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>)", 3.0, 2),
        ("normalize", 2.0, 100), ("partial_stats", 1.0, 100), ("channel_bias_add", 1.5, 60),
        ("nvjet_sm90_tst_168x128_64x5_1x2_h_bz_coopA_bias_TNN", 0.5, 26),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>", 2.0, 112),
        ("void at::native::(anonymous namespace)::upsample_nearest2d_nhwc_out_frame<c10::BFloat16>", 1.0, 3),
        ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>", 1.0, 10),
    ]
    summary = summarize_kernels(kernels)
    kinds = summary["kinds"]
    assert summary["gpu_ms"] == pytest.approx(26.0)
    assert kinds["convolution"]["ms"] == pytest.approx(11.0) and kinds["convolution"]["calls"] == 34
    assert kinds["attention"]["ms"] == pytest.approx(7.0)
    assert kinds["group norm (Triton)"]["ms"] == pytest.approx(3.0)
    assert kinds["bias and skip add (Triton)"]["ms"] == pytest.approx(1.5)
    assert kinds["matmul"]["ms"] == pytest.approx(0.5)
    assert kinds["elementwise"]["ms"] == pytest.approx(2.0) and kinds["upsample"]["ms"] == pytest.approx(1.0)
    assert list(kinds)[0] == "convolution" and sum(k["share"] for k in kinds.values()) == pytest.approx(1.0)
    assert summary["longest"][0]["ms"] == 10.0 and len(summary["longest"]) == 10


def test_gpu_idle_time_is_charged_to_the_stage_that_was_waited_for():
    """busy_by_stage on a hand-made trace (the shape torch.profiler exports): times in microseconds."""
    from hypir.bench.common import busy_by_stage

    def x(cat, name, ts, dur, correlation=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
                "args": {} if correlation is None else {"correlation": correlation}}

    events = [
        x("user_annotation", "hypir.encode", 0, 100), x("user_annotation", "hypir.decode", 100, 400),
        x("user_annotation", "other range", 0, 1000),
        x("cuda_runtime", "cudaLaunchKernel", 10, 5, 1), x("cuda_runtime", "cudaLaunchKernel", 20, 5, 2),
        x("cuda_runtime", "cudaGraphLaunch", 150, 5, 3), x("cuda_runtime", "cudaLaunchKernel", 900, 5, 4),
        x("kernel", "conv_a", 20, 100, 1),  # 20 us idle from the first range's start, charged to encode
        x("kernel", "conv_b", 60, 100, 2),  # overlaps: busy only 120..160
        x("kernel", "graph_k", 200, 50, 3),  # 40 us idle after 160: decode's
        x("gpu_memcpy", "Memcpy DtoH", 950, 10, 4),  # launched outside every stage: 700 us idle, "outside"
    ]
    result = busy_by_stage(events)
    assert result["stages"]["encode"] == pytest.approx({"busy_ms": 0.14, "idle_ms": 0.02, "activities": 2})
    assert result["stages"]["decode"] == pytest.approx({"busy_ms": 0.05, "idle_ms": 0.04, "activities": 1})
    assert result["stages"]["outside"] == pytest.approx({"busy_ms": 0.01, "idle_ms": 0.7, "activities": 1})
    assert (result["window_ms"], result["busy_ms"]) == pytest.approx((0.96, 0.2))
    assert result["busy_fraction"] == pytest.approx(0.2 / 0.96)
    assert [(g["stage"], g["after"], g["before"]) for g in result["gaps"]] == [
        ("outside", "graph_k", "Memcpy DtoH"), ("decode", "conv_b", "graph_k"), ("encode", "(pass start)", "conv_a")]
    assert result["cpu"]["encode"]["cpu_ms"] == pytest.approx(0.1)
    assert [c["name"] for c in result["cpu"]["encode"]["longest"]] == ["cudaLaunchKernel"] * 2
    assert [c["ms"] for c in result["cpu"]["encode"]["longest"]] == pytest.approx([0.005] * 2)
    assert result["cpu"]["decode"]["cpu_ms"] == pytest.approx(0.4)
    assert [c["name"] for c in result["cpu"]["decode"]["longest"]] == ["cudaGraphLaunch"]
    assert busy_by_stage([])["busy_fraction"] == 0.0


def test_a_kernel_is_charged_to_the_innermost_range_that_launched_it():
    """launcher on nested ranges (the per-module profile's modules in modules): the innermost range open at the
    launch, not one that ended before it or one that starts after it."""
    from hypir.bench.common import annotated_ranges, launcher

    def x(cat, name, ts, dur, correlation=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur,
                "args": {} if correlation is None else {"correlation": correlation}}

    events = [x("user_annotation", "mod:unet", 0, 100), x("user_annotation", "mod:unet.a", 10, 20),
              x("user_annotation", "mod:unet.a.b", 12, 5), x("user_annotation", "mod:unet.c", 40, 30),
              x("user_annotation", "hypir.unet", 0, 200)]
    events += [x("cuda_runtime", "cudaLaunchKernel", ts, 1, i) for i, ts in enumerate((14, 25, 35, 50, 150))]
    launched_in = launcher(events, annotated_ranges(events, "mod:"))
    kernel = lambda i: x("kernel", "k", 300, 1, i)  # noqa: E731
    assert [launched_in(kernel(i)) for i in range(5)] == ["unet.a.b", "unet.a", "unet", "unet.c", None]
    assert launched_in(kernel(99)) is None  # no launch recorded for it
