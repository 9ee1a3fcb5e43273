"""Image files in and out (hypir/images.py) on real files that Pillow, pypng and tifffile write: orientation,
16-bit, palette, CMYK, ICC and EXIF, animations, damaged files, atomic writes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import png
import pytest
import tifffile
from PIL import Image, ImageCms, ImageOps

from hypir import images
from hypir.images import ImageError, check_output, is_hypir_output, read_image, write_image

RNG = np.random.default_rng(0)
RGB = (RNG.random((12, 20, 3)) * 255).astype(np.uint8)
SRGB_ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_with(**tags) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[{"orientation": 0x0112, "make": 0x010F}[tag]] = value
    return exif.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow_applies_it(tmp_path, orientation):
    path = tmp_path / "phone.jpg"
    Image.fromarray(RGB).save(path, exif=exif_with(orientation=orientation), quality=100)
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img))
    picture = read_image(path)
    got = np.rint(picture.frames[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    portrait = orientation in (5, 6, 7, 8)
    assert picture.size == ((20, 12) if portrait else (12, 20))


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    data = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    Image.fromarray(data).save(tmp_path / "scan.png")
    picture = read_image(tmp_path / "scan.png")
    assert picture.bit_depth == 16 and picture.channels == 1
    np.testing.assert_array_equal(picture.frames[0][0], data.astype(np.float32) / 65535)


@pytest.mark.parametrize("planes", [2, 3, 4])
def test_16bit_colour_png_keeps_all_16_bits(tmp_path, planes):
    data = RNG.integers(0, 65536, (9, 11, planes)).astype(np.uint16)
    with open(tmp_path / "scan.png", "wb") as f:
        png.Writer(11, 9, greyscale=planes <= 2, alpha=planes in (2, 4), bitdepth=16).write(f, data.reshape(9, -1))
    picture = read_image(tmp_path / "scan.png")
    assert picture.bit_depth == 16 and picture.channels == planes
    np.testing.assert_array_equal(picture.frames[0], data.transpose(2, 0, 1).astype(np.float32) / 65535)


def test_16bit_rgb_tiff_keeps_all_16_bits(tmp_path):
    data = RNG.integers(0, 65536, (9, 11, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "scan.tif", data, compression="zlib")
    picture = read_image(tmp_path / "scan.tif")
    assert picture.bit_depth == 16
    np.testing.assert_array_equal(picture.frames[0], data.transpose(2, 0, 1).astype(np.float32) / 65535)


def test_palette_cmyk_and_bilevel_are_converted(tmp_path):
    Image.fromarray(RGB).convert("P").save(tmp_path / "p.png")
    transparent = Image.fromarray(RGB).convert("P")
    transparent.info["transparency"] = 0
    transparent.save(tmp_path / "pt.png", transparency=0)
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    Image.fromarray(RGB).convert("1").save(tmp_path / "b.png")
    assert read_image(tmp_path / "p.png").channels == 3
    assert read_image(tmp_path / "pt.png").channels == 4
    cmyk = read_image(tmp_path / "c.jpg")
    with Image.open(tmp_path / "c.jpg") as img:
        np.testing.assert_array_equal(cmyk.frames[0], np.asarray(img.convert("RGB")).transpose(2, 0, 1) / np.float32(255))
    assert "CMYK without an ICC profile" in cmyk.notes[0]
    bilevel = read_image(tmp_path / "b.png")
    assert bilevel.channels == 1 and set(np.unique(bilevel.frames[0])) <= {0.0, 1.0}


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_icc_and_exif_are_carried_with_the_orientation_reset(tmp_path, suffix):
    source = tmp_path / "in.jpg"
    Image.fromarray(RGB).save(source, exif=exif_with(orientation=6, make="PhoneCo"), icc_profile=SRGB_ICC)
    picture = read_image(source)
    out = tmp_path / f"out{suffix}"
    write_image(out, [np.clip(picture.frames[0], 0, 1)], picture)
    with Image.open(out) as img:
        exif = img.getexif()
        assert img.info.get("icc_profile") == SRGB_ICC
        assert exif.get(0x010F) == "PhoneCo" and exif.get(0x0112) == 1
        assert img.size == (12, 20)  # already upright: nothing may rotate it again
    assert is_hypir_output(out)


def test_16bit_input_gives_a_16bit_png_with_its_metadata(tmp_path):
    data = RNG.integers(0, 65536, (9, 11, 3)).astype(np.uint16)
    with open(tmp_path / "scan.png", "wb") as f:
        png.Writer(11, 9, greyscale=False, bitdepth=16).write(f, data.reshape(9, -1))
    picture = read_image(tmp_path / "scan.png")
    picture.icc_profile = SRGB_ICC
    write_image(tmp_path / "out.png", picture.frames, picture)
    width, height, rows, info = png.Reader(filename=str(tmp_path / "out.png")).asDirect()
    assert info["bitdepth"] == 16 and (width, height) == (11, 9)
    np.testing.assert_array_equal(np.vstack([np.asarray(r) for r in rows]).reshape(9, 11, 3), data)
    with Image.open(tmp_path / "out.png") as img:
        assert img.info.get("icc_profile") == SRGB_ICC
    assert is_hypir_output(tmp_path / "out.png")


def test_animation_every_frame_read_and_written(tmp_path):
    frames = [Image.fromarray(np.full((8, 10, 3), v, np.uint8)) for v in (0, 120, 250)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=[40, 80, 120], loop=0)
    picture = read_image(tmp_path / "anim.gif")
    assert len(picture.frames) == 3 and picture.durations == [40, 80, 120]
    assert [round(float(f.mean()) * 255) for f in picture.frames] == [0, 120, 250]
    write_image(tmp_path / "anim.png", picture.frames, picture)
    with Image.open(tmp_path / "anim.png") as img:
        assert img.n_frames == 3
        img.seek(2)
        assert np.asarray(img.convert("RGB")).mean() == pytest.approx(250, abs=1)
    with pytest.raises(ImageError, match="3 frames and JPEG holds one"):
        check_output(tmp_path / "anim.jpg", (8, 10), 3, 3)


@pytest.mark.parametrize("content,message", [
    (b"", "not an image Pillow can read"),
    (b"hello, not an image", "not an image Pillow can read"),
])
def test_unreadable_files_are_named(tmp_path, content, message):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=f"^{path}: {message}"):
        read_image(path)


def test_truncated_jpeg_is_named(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray((RNG.random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match=f"^{path}: cannot be decoded .*damaged or incomplete"):
        read_image(path)


def test_decompression_bomb_is_named(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 400 megapixels claimed, a few bytes of data
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match=f"^{path}: refused as a possible decompression bomb"):
        read_image(path)


def test_float_and_32bit_samples_are_refused_with_the_fix(tmp_path):
    Image.fromarray(RNG.random((4, 4)).astype(np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="floating-point samples .*16-bit PNG or TIFF"):
        read_image(tmp_path / "f.tif")
    Image.fromarray(np.full((4, 4), 1 << 20, np.int32), "I").save(tmp_path / "i.tif")
    with pytest.raises(ImageError, match="32-bit integer samples"):
        read_image(tmp_path / "i.tif")


def test_frames_of_different_sizes_are_refused(tmp_path):
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((8, 8, 3), np.uint8))
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((6, 9, 3), np.uint8), append=True)
    with pytest.raises(ImageError, match="frames differ in size"):
        read_image(tmp_path / "pages.tif")


@pytest.mark.parametrize("suffix,size,channels,message", [
    (".webp", (100, 20000), 3, "WEBP holds at most 16383 px"),
    (".jpg", (10, 10), 4, "JPEG has no transparency"),
    (".bmp", (10, 10), 3, "must end in .png, .jpg, .webp or .tif"),
])
def test_outputs_a_format_cannot_hold_are_refused(tmp_path, suffix, size, channels, message):
    with pytest.raises(ImageError, match=message):
        check_output(tmp_path / f"out{suffix}", size, channels, 1)


def test_a_stopped_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous output")
    picture = images.Picture(tmp_path / "in.png", [np.zeros((3, 4, 4), np.float32)], 8)

    def stopped(f, *args, **kwargs):
        f.write(b"half a png")
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "_save_with_pillow", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_image(target, picture.frames, picture)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert target.read_bytes() == b"previous output"


def test_files_hypir_did_not_write_are_not_its_outputs(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "photo.png")
    assert not is_hypir_output(tmp_path / "photo.png")
    (tmp_path / "notes.png").write_text("text")
    assert not is_hypir_output(tmp_path / "notes.png")
