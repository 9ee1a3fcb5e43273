"""Real photos and folders through `hypir restore`, in-process through cli.main (the models load once per test
session from the shared cache): nothing overwritten, every bad input named before any work, images as they
are meant to be seen, options checked with the user's own names."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import png
import pytest
import torch
from PIL import Image

from hypir import cli
from hypir.images import is_hypir_output

RNG = np.random.default_rng(1)


def photo(path: Path, size=(40, 32), **save) -> Path:
    data = (RNG.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(data).save(path, **save)
    return path


def run(capsys, tiny_files, *args, models=True) -> tuple[int, str, str]:
    folder, weights = tiny_files
    extra = ["--base", str(folder), "--weights", str(weights), "--device", "cpu"] if models else []
    code = cli.main(["restore", *map(str, args), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---- 1. nothing is ever lost ---------------------------------------------------------------------------------

def test_an_output_that_is_its_input_is_refused(tmp_path, capsys, tiny_files):
    original = photo(tmp_path / "a.png")
    before = original.read_bytes()
    code, _, err = run(capsys, tiny_files, original, "-o", original)
    assert code == 1 and "is an input file; nothing is ever written over an original" in err
    code, _, err = run(capsys, tiny_files, original, "-o", original, "--overwrite")
    assert code == 1 and original.read_bytes() == before


def test_a_folder_into_itself_is_refused_before_any_work(tmp_path, capsys, tiny_files):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.jpg"):
        photo(photos / name)
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    code, _, err = run(capsys, tiny_files, photos, "-o", photos)
    assert code == 1 and "restoring a folder into itself" in last_line(err)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_existing_files_are_kept_unless_they_are_hypir_outputs_or_overwrite(tmp_path, capsys, tiny_files):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    out.mkdir()
    photo(photos / "a.png")
    photo(photos / "b.png")
    mine = photo(out / "b.png")  # the user's own file where an output would go
    code, _, err = run(capsys, tiny_files, photos, "-o", out)
    assert code == 1 and f"its output {mine} exists and was not written by hypir" in err
    assert sorted(p.name for p in out.iterdir()) == ["b.png"]  # refused before any work: a.png not written either
    assert not is_hypir_output(mine)

    assert run(capsys, tiny_files, photos, "-o", out, "--overwrite")[0] == 0
    assert is_hypir_output(out / "a.png") and is_hypir_output(out / "b.png")
    # hypir's own outputs are replaced on a rerun without any flag.
    stamp = (out / "a.png").stat().st_mtime_ns
    time.sleep(0.01)
    assert run(capsys, tiny_files, photos, "-o", out)[0] == 0
    assert (out / "a.png").stat().st_mtime_ns != stamp


def test_skip_existing_resumes_a_folder(tmp_path, capsys, tiny_files):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        photo(photos / name)
    assert run(capsys, tiny_files, photos / "a.png", "-o", out / "a.png")[0] == 0
    stamp = (out / "a.png").stat().st_mtime_ns
    code, out_text, err = run(capsys, tiny_files, photos, "-o", out, "--skip-existing")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    assert (out / "a.png").stat().st_mtime_ns == stamp
    assert "photos/a.png ->" not in out_text and "1 outputs exist already and are kept" in err


# ---- 2. every input checked before the models load ----------------------------------------------------------

def test_bad_files_in_a_folder_are_all_named_before_any_work(tmp_path, capsys, tiny_files):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    photo(photos / "good.png")
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("not an image")
    (photos / "notes.txt").write_text("left alone")
    (photos / "._good.png").write_bytes(b"\0\5\x16\7")  # a macOS AppleDouble companion: hidden, skipped
    code, _, err = run(capsys, tiny_files, photos, "-o", out, "--weights", tmp_path / "absent.pth")
    # Both bad files named, each with its path; the weights (checked later) never looked at; nothing written.
    assert code == 1
    assert f"{photos / 'empty.jpg'}: not an image Pillow can read" in err
    assert f"{photos / 'text.png'}: not an image Pillow can read" in err
    assert "absent.pth" not in err and not out.exists()
    assert last_line(err) == ("hypir: error: 2 of 3 inputs cannot be restored; nothing was restored (--keep-going "
                              "restores the others)")
    assert "1 files that are not images of a supported kind were left alone (.txt)" in err


def test_keep_going_restores_the_good_files_and_ends_non_zero(tmp_path, capsys, tiny_files):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    photo(photos / "a.png")
    photo(photos / "c.jpg")
    (photos / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out_text, err = run(capsys, tiny_files, photos, "-o", out, "--keep-going")
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert f"hypir: skipping {photos / 'b.png'}" in err
    assert last_line(err) == "hypir: error: 1 of 3 inputs failed; 2 restored"


def test_an_extreme_strip_is_refused_up_front_with_the_numbers(tmp_path, capsys, tiny_files):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (40000, 2), (128, 128, 128)).save(strip)
    code, _, err = run(capsys, tiny_files, strip, "-o", tmp_path / "out.png")
    assert code == 1
    assert f"{strip}: a 80000x4 output (processed at 10240000x512: short sides are raised to 512)" in err
    assert "GiB for its image buffers alone" in err and not (tmp_path / "out.png").exists()


@pytest.mark.slow
def test_a_stopped_folder_run_leaves_nothing_partial(tmp_path, tiny_files):
    """SIGTERM in the middle of a folder: finished outputs are whole, nothing partial is left, exit 143."""
    folder, weights = tiny_files
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for i in range(40):
        photo(photos / f"p{i:02d}.png", size=(64, 64))
    process = subprocess.Popen([sys.executable, "-m", "hypir", "restore", str(photos), "-o", str(out), "--base",
                                str(folder), "--weights", str(weights), "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and len(list(out.glob("*.png"))) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in last_line(err)
    written = sorted(out.iterdir())
    assert 2 <= len(written) < 40
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in written), written
    for p in written:
        with Image.open(p) as img:
            img.load()
            assert img.size == (128, 128)


# ---- 3. images as they are meant to be seen ------------------------------------------------------------------

def test_phone_portrait_comes_out_upright(tmp_path, capsys, tiny_files):
    exif = Image.Exif()
    exif[0x0112] = 6
    source = photo(tmp_path / "IMG_0001.JPG", size=(40, 30), exif=exif.tobytes())
    assert run(capsys, tiny_files, source, "-o", tmp_path / "out.jpg", "--quality", "90")[0] == 0
    with Image.open(tmp_path / "out.jpg") as img:
        assert img.size == (60, 80) and img.getexif().get(0x0112) == 1


def test_16bit_scans_come_out_16bit(tmp_path, capsys, tiny_files):
    grey = np.linspace(1000, 60000, 30 * 20).reshape(30, 20).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgb = RNG.integers(2000, 60000, (30, 20, 3)).astype(np.uint16)
    with open(tmp_path / "rgb.png", "wb") as f:
        png.Writer(20, 30, greyscale=False, bitdepth=16).write(f, rgb.reshape(30, -1))
    code, _, err = run(capsys, tiny_files, tmp_path / "grey.png", tmp_path / "rgb.png", "-o", tmp_path / "out",
                       "--latent", "mode")
    assert code == 0, err
    with Image.open(tmp_path / "out" / "grey.png") as img:
        assert img.mode == "I;16" and img.size == (40, 60)
        values = np.asarray(img)
        # Not washed out: the colour fix keeps the input's range (1000..60000 of 65535).
        assert 500 < values.mean() / 1 < 65000 and values.max() > 255 and values.std() > 1000
    _, _, rows, info = png.Reader(filename=str(tmp_path / "out" / "rgb.png")).asDirect()
    assert info["bitdepth"] == 16 and info["planes"] == 3


def test_animated_gif_every_frame_restored(tmp_path, capsys, tiny_files):
    frames = [Image.fromarray(np.full((24, 32, 3), v, np.uint8)) for v in (30, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    code, out_text, err = run(capsys, tiny_files, tmp_path / "anim.gif", "-o", tmp_path / "anim.png")
    assert code == 0, err
    assert "(2 frames)" in out_text
    with Image.open(tmp_path / "anim.png") as img:
        assert img.n_frames == 2 and img.size == (64, 48)
    code, _, err = run(capsys, tiny_files, tmp_path / "anim.gif", "-o", tmp_path / "anim.jpg")
    assert code == 1 and "2 frames and JPEG holds one" in err


# ---- 4-5. memory plan, non-finite values ----------------------------------------------------------------------

def test_weights_with_nan_are_refused_naming_the_tensor(tmp_path, capsys, tiny_files):
    state = torch.load(tiny_files[1], weights_only=True)
    key = sorted(state)[3]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    bad = tmp_path / "HYPIR_nan.pth"
    torch.save(state, bad)
    source = photo(tmp_path / "a.png")
    code = cli.main(["restore", str(source), "-o", str(tmp_path / "out.png"), "--base", str(tiny_files[0]),
                     "--weights", str(bad), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}: the HYPIR weights are damaged: tensor {key} holds 1 NaN" in err
    assert not (tmp_path / "out.png").exists()


def test_a_non_finite_pass_is_never_returned(tiny_models, image_factory):
    import copy

    from hypir.pipeline import HYPIRPipeline, NonFiniteError

    models = copy.copy(tiny_models)
    models.vae = copy.deepcopy(tiny_models.vae)
    with torch.no_grad():
        models.vae.decoder.conv_out.weight.fill_(3e38)  # sums overflow float32
    with pytest.raises(NonFiniteError, match="the VAE decoder's image holds [0-9]+ NaN or infinite values"):
        HYPIRPipeline(models)(image_factory(1, 16, 16), upscale=2.0, latent="mode")


# ---- 7. options checked with the user's own names --------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--upscale", "nan", "argument --upscale: must be a number in (0, 16], got nan"),
    ("--upscale", "1e400", "argument --upscale: must be a number in (0, 16], got inf"),
    ("--seed", "1" * 30, "argument --seed: must be an integer in 0..18446744073709551615"),
    ("--coeff-t", "5000", "argument --coeff-t: must be an integer in 1..999, got 5000"),
    ("--tile-size", "100", "argument --tile-size: must be 'auto' or a multiple of 8 in 64..65536"),
    ("--tile-size", "big", "argument --tile-size: not a number: 'big'"),
    ("--vram-budget", "inf", "argument --vram-budget: must be in 0.25..65536, got inf"),
    ("--quality", "0", "argument --quality: must be in 1..100, got 0"),
])
def test_bad_numbers_name_the_option(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as stop:
        cli.main(["restore", "a.png", "-o", "b.png", flag, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_stride_at_the_tile_size_becomes_half_of_it(tmp_path, capsys, tiny_files, pipe, image_factory):
    from hypir.settings import RestoreOptions

    plan = pipe.plan(image_factory(1, 64, 64), RestoreOptions(upscale=4.0, tile_size=128, tile_stride=256))
    assert (plan.tile, plan.stride) == (128, 64)
    result = pipe(image_factory(1, 64, 64), upscale=8.0, latent="mode", tile_size=256, tile_stride=256)
    assert (result.tile_size, result.tile_stride) == (256, 128)
    code, out_text, err = run(capsys, tiny_files, photo(tmp_path / "a.png", size=(64, 64)), "-o", tmp_path / "o.png",
                              "--upscale", "8", "--tile-size", "256")
    assert code == 0, err
    assert "tiles 256/128" in out_text


@pytest.mark.parametrize("text,message", [
    ("HYPIR_CONFIG = {'coeff_t': 5000}\n", "HYPIR_CONFIG['coeff_t'] must be an integer in 1..999, got 5000"),
    ("HYPIR_CONFIG = {'attention': auto}\n", "name 'auto' is not defined: put text values in quotes"),
    ("HYPIR_CONFIG = {'upscale': float('nan')}\n", "HYPIR_CONFIG['upscale'] must be a number in (0, 16], got nan"),
    ("HYPIR_CONFIG = {'color_fix': 'yes'}\n", "HYPIR_CONFIG['color_fix'] must be True or False"),
    ("HYPIR_CONFIG = {'seed': 231\n", "line 1:"),
])
def test_config_mistakes_name_the_file_and_key(tmp_path, capsys, monkeypatch, text, message):
    config = tmp_path / "my_config.py"
    config.write_text(text)
    monkeypatch.setenv("HYPIR_CONFIG_FILE", str(config))
    assert cli.main(["restore", "a.png", "-o", "b.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hypir: error: {config}") and message in err, err


# ---- 6. download, then restore ------------------------------------------------------------------------------

def test_the_download_layout_is_what_restore_searches(tmp_path, monkeypatch):
    from hypir.errors import BASE_FOLDER, HYPIRLoadError
    from hypir.model_files import resolve_model_files

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYPIR_MODELS_DIR", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(HYPIRLoadError, match="Pass --download .* or give the file with --weights PATH"):
        resolve_model_files()
    models = tmp_path / "models"
    (models / BASE_FOLDER / "unet").mkdir(parents=True)
    (models / "HYPIR_sd2.pth").write_bytes(b"x")
    files = resolve_model_files()
    assert Path(files.weights) == models / "HYPIR_sd2.pth" and Path(files.base) == models / BASE_FOLDER
    (models / "HYPIR_sd2.pth").unlink()
    (models / BASE_FOLDER / "unet").rmdir()
    (models / "HYPIR_sd2.pth").write_bytes(b"x")
    with pytest.raises(HYPIRLoadError, match="base model not found .*--download.*--base PATH"):
        resolve_model_files()


# ---- 8. console ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["download", "--help"], ["restore", "--help"]])
def test_help_and_version_start_without_torch(args):
    code = ("import sys, time\nstart = time.perf_counter()\nfrom hypir.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, time.perf_counter() - start)\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - start
    imported, seconds = result.stdout.strip().splitlines()[-1].split()
    assert imported == "False", result.stdout
    assert float(seconds) < 0.5 and wall < 1.0, (seconds, wall)


def test_an_error_during_the_run_is_the_last_line(tmp_path, capsys, tiny_files):
    """A pass that fails with the progress bar open: the bar is closed first, the error is the last line, and
    nothing is written for that file."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "overflowing_sd"
    shutil.copytree(tiny_files[0], base)
    vae_file = base / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(vae_file)
    state["decoder.conv_out.weight"].fill_(3e38)  # finite weights whose sums overflow float32
    save_file(state, vae_file)
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(photos / "a.png")
    code = cli.main(["restore", str(photos), "-o", str(tmp_path / "out"), "--base", str(base), "--weights",
                     str(tiny_files[1]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert last_line(err).startswith(f"hypir: error: {photos / 'a.png'}: the VAE decoder's image holds"), err
    bar_end = err.rindex("HYPIR:")
    assert bar_end < err.rindex("hypir: error:")  # the bar was drawn, and closed before the error
    assert "\r" not in err[err.rindex("hypir: error:"):]  # nothing redraws over the error
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_logging_is_configured_for_hypir_only_and_only_during_the_command(capsys):
    """The root logger is left alone (huggingface_hub has its own handler: a root handler printed its lines
    twice), and hypir's own handler goes away with the command."""
    import logging

    root_handlers, hypir_handlers = list(logging.getLogger().handlers), list(logging.getLogger("hypir").handlers)
    assert cli.main(["doctor"]) == 0
    assert logging.getLogger().handlers == root_handlers
    assert logging.getLogger("hypir").handlers == hypir_handlers
    capsys.readouterr()
