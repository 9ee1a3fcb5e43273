"""Image files in and out for the command line: read as they are meant to be seen, written without loss.

Reading: the EXIF orientation is applied; 8- and 16-bit samples are scaled to [0, 1] (16-bit PNG through
pypng, which keeps all 16 bits of RGB where Pillow keeps 8; 16-bit RGB TIFF through tifffile); palette, CMYK
(through its ICC profile when it has one), bilevel and premultiplied modes are converted; every frame of an
animation is read. Channels: 1 grey, 2 grey and alpha, 3 RGB, 4 RGBA (the pipeline keeps them).

Writing: the format follows the suffix (PNG, JPEG, WebP, TIFF); a 16-bit input gives a 16-bit PNG; the ICC
profile and the EXIF data (orientation reset, pixel dimensions updated) are carried over; the Software tag
marks the file as this tool's output; the file is written under a temporary name and renamed, so a stopped
run never leaves a partial file under the output's name. No torch here.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from . import __version__

logger = logging.getLogger("hypir")

SOFTWARE = f"hypir {__version__}"
INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
FORMAT_SUFFIX = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp", "tiff": ".tif", "tif": ".tif"}
MAX_SIDE = {"JPEG": 65535, "WEBP": 16383, "PNG": 2**31 - 1, "TIFF": 2**32 - 1}
MULTI_FRAME_FORMATS = ("PNG", "WEBP", "TIFF")
PARTIAL_SUFFIX = ".partial"
EXIF_ORIENTATION, EXIF_SOFTWARE, EXIF_IFD = 0x0112, 0x0131, 0x8769
EXIF_PIXEL_X, EXIF_PIXEL_Y = 0xA002, 0xA003


class ImageError(ValueError):
    """An input or output file that cannot be used; the message starts with its path."""


@dataclass
class Picture:
    """A decoded image file: its frames as (C, H, W) float32 arrays in [0, 1], and what its output keeps."""

    path: Path
    frames: list[np.ndarray]
    bit_depth: int  # 8 or 16: the precision of the samples read
    icc_profile: bytes | None = None
    exif: Image.Exif | None = None
    durations: list[int] = field(default_factory=list)  # milliseconds per frame (animations)
    loop: int = 0
    notes: list[str] = field(default_factory=list)  # conversions worth telling the user

    @property
    def channels(self) -> int:
        return self.frames[0].shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) after orientation."""
        return self.frames[0].shape[1], self.frames[0].shape[2]

    def describe(self) -> str:
        h, w = self.size
        kind = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}[self.channels]
        frames = f", {len(self.frames)} frames" if len(self.frames) > 1 else ""
        return f"{w}x{h} {kind} {self.bit_depth}-bit{frames}"


# ----------------------------------------------------------------------------------------------
# Reading


def read_image(path: str | os.PathLike, data: bytes | None = None) -> Picture:
    """Decode every frame of `path` (or of `data`, the file's bytes read from elsewhere, `path` naming it);
    ImageError (naming the file and the fix) for anything unusable."""
    path = Path(path) if data is None else path
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as img:
            return _decode(path, img, data)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a possible decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (damaged, empty, or another kind of file)") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        # Pillow reports damaged data as OSError ("image file is truncated"), SyntaxError or ValueError.
        reason = str(exc).strip() or type(exc).__name__
        raise ImageError(f"{path}: cannot be decoded ({reason}); the file is damaged or incomplete") from None


def _decode(path: Path, img: Image.Image, data: bytes | None = None) -> Picture:
    fmt = img.format or "?"
    notes: list[str] = []
    count = getattr(img, "n_frames", 1)
    if fmt == "MPO" and count > 1:
        notes.append(f"multi-picture JPEG: its primary picture restored; the {count - 1} extra pictures (previews, "
                     f"depth maps) are not carried over")
        count = 1
    exif = img.getexif()
    orientation = exif.get(EXIF_ORIENTATION, 1) if exif else 1
    icc = img.info.get("icc_profile") or None
    depth16 = _png_bit_depth(path, data) == 16 if fmt == "PNG" else False
    frames, durations = [], []
    for index in range(count):
        img.seek(index)
        if depth16 and count == 1 and img.mode != "I;16":
            array = _read_png16(path, data)
        elif fmt == "TIFF" and _tiff_16bit_colour(img):
            array = _read_tiff16(path, index, img, notes, data)
        else:
            array, icc = _pixels(path, img, icc, notes)
        frames.append(_orient(array, orientation))
        durations.append(int(img.info.get("duration", 0) or 0))
    sizes = {f.shape[1:] for f in frames}
    if len(sizes) > 1:
        raise ImageError(f"{path}: its {count} frames differ in size ({sorted(sizes)}); save each frame as its own "
                         f"file")
    bit_depth = 16 if any(f.dtype == np.uint16 for f in frames) else 8
    floats = [f.astype(np.float32) / np.float32(65535.0 if f.dtype == np.uint16 else 255.0) for f in frames]
    return Picture(path, floats, bit_depth, icc, exif or None, durations if count > 1 else [],
                   int(img.info.get("loop", 0) or 0), notes)


def _pixels(path: Path, img: Image.Image, icc: bytes | None, notes: list[str]) -> tuple[np.ndarray, bytes | None]:
    """(C, H, W) uint8 or uint16 samples of the current frame, and the ICC profile that describes them."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img, dtype=np.uint16)[None], icc
    if mode == "I":
        data = np.asarray(img)
        if data.min() >= 0 and data.max() <= 65535:  # 16-bit grey as some Pillow versions open it
            return data.astype(np.uint16)[None], icc
        raise ImageError(f"{path}: 32-bit integer samples are not supported; save it as a 16-bit PNG or TIFF")
    if mode == "F":
        raise ImageError(f"{path}: floating-point samples (mode F) have no fixed white level; save it as a 16-bit "
                         f"PNG or TIFF")
    if mode == "CMYK":
        if icc:
            try:
                img = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                                ImageCms.createProfile("sRGB"), outputMode="RGB")
                notes.append("CMYK converted to sRGB through its ICC profile")
                return _channels_first(np.asarray(img)), None
            except (ImageCms.PyCMSError, OSError) as exc:
                notes.append(f"CMYK profile unusable ({exc}); converted without it")
        else:
            notes.append("CMYK without an ICC profile: converted with Pillow's plain formula")
        return _channels_first(np.asarray(img.convert("RGB"))), None
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in img.info
        return _channels_first(np.asarray(img.convert("RGBA" if transparent else "RGB"))), icc
    targets = {"1": "L", "L": "L", "LA": "LA", "La": "LA", "RGB": "RGB", "RGBA": "RGBA", "RGBa": "RGBA",
               "RGBX": "RGB", "YCbCr": "RGB", "HSV": "RGB", "LAB": "RGB"}
    if mode not in targets:
        raise ImageError(f"{path}: pixel mode {mode} is not supported; save it as an 8- or 16-bit RGB or grey image")
    try:
        converted = img if img.mode == targets[mode] else img.convert(targets[mode])
    except ValueError as exc:
        raise ImageError(f"{path}: pixel mode {mode} cannot be converted ({exc}); save it as RGB") from None
    return _channels_first(np.asarray(converted)), icc


def _channels_first(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _png_bit_depth(path: Path, data: bytes | None = None) -> int | None:
    """The bit depth in a PNG's IHDR chunk (Pillow reads 16-bit RGB PNGs at 8 bits and does not say)."""
    if data is not None:
        head = data[:26]
    else:
        with open(path, "rb") as f:
            head = f.read(26)
    return head[24] if len(head) == 26 and head[12:16] == b"IHDR" else None


def _read_png16(path: Path, data: bytes | None = None) -> np.ndarray:
    import png  # pypng

    reader = png.Reader(bytes=data) if data is not None else png.Reader(filename=str(path))
    width, height, rows, info = reader.asDirect()
    planes = info["planes"]
    data = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    if info["bitdepth"] != 16:
        data = (data.astype(np.uint32) * 65535 // (2 ** info["bitdepth"] - 1)).astype(np.uint16)
    return _channels_first(data[..., 0] if planes == 1 else data)


def _tiff_16bit_colour(img: Image.Image) -> bool:
    bits = img.tag_v2.get(258) if hasattr(img, "tag_v2") else None
    samples = img.tag_v2.get(277, 1) if hasattr(img, "tag_v2") else 1
    return bool(bits) and tuple(bits)[0] == 16 and samples >= 3


def _read_tiff16(path: Path, index: int, img: Image.Image, notes: list[str], raw: bytes | None = None
                 ) -> np.ndarray:
    import tifffile

    try:
        data = tifffile.imread(io.BytesIO(raw) if raw is not None else str(path), key=index)
    except (KeyError, ValueError, NotImplementedError, OSError) as exc:  # a codec tifffile lacks (LZW needs imagecodecs)
        notes.append(f"16-bit TIFF read at 8-bit precision ({exc}); `pip install imagecodecs` reads all 16 bits")
        return _pixels(path, img, None, notes)[0]
    if data.ndim != 3 or data.shape[2] not in (3, 4) or data.dtype != np.uint16:
        notes.append(f"16-bit TIFF of shape {data.shape} read through Pillow at 8-bit precision")
        return _pixels(path, img, None, notes)[0]
    return _channels_first(data)


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to a (C, H, W) array: the picture as the camera meant it to be seen."""
    if orientation in (5, 6, 7, 8):
        array = array.transpose(0, 2, 1)  # transpose: orientation 5
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]  # what is left to do after the transpose
    if orientation in (2, 3):
        array = array[:, :, ::-1]
    if orientation in (3, 4):
        array = array[:, ::-1, :]
    return np.ascontiguousarray(array)


# ----------------------------------------------------------------------------------------------
# Writing


def output_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ImageError(f"{path}: the output must end in .png, .jpg, .webp or .tif (the format follows the suffix)")
    return OUTPUT_FORMATS[suffix]


def check_output(path: Path, picture_size: tuple[int, int], channels: int, frames: int) -> None:
    """Refuse, before any work, an output file its format cannot hold."""
    fmt = output_format(path)
    height, width = picture_size
    if max(height, width) > MAX_SIDE[fmt]:
        raise ImageError(f"{path}: {fmt} holds at most {MAX_SIDE[fmt]} px a side and the output is {width}x{height}; "
                         f"write .png or .tif")
    if fmt == "JPEG" and channels in (2, 4):
        raise ImageError(f"{path}: JPEG has no transparency and the input has an alpha channel; write .png, .webp or "
                         f".tif")
    if frames > 1 and fmt not in MULTI_FRAME_FORMATS:
        raise ImageError(f"{path}: the input has {frames} frames and {fmt} holds one; write .png (animated PNG), "
                         f".webp or .tif")


def partial_name(name: str, pid: int | None = None) -> str:
    """The temporary name an output is written under by process `pid` (this one) before it is renamed."""
    return f".{name}.{os.getpid() if pid is None else pid}{PARTIAL_SUFFIX}"


def write_image(path: str | os.PathLike, frames: list[np.ndarray], source: Picture, quality: int = 95) -> None:
    """Write restored (C, H, W) frames in [0, 1] with the source's metadata, atomically."""
    path = Path(path)
    check_output(path, frames[0].shape[1:], frames[0].shape[0], len(frames))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(partial_name(path.name))
    try:
        with open(tmp, "wb") as f:
            _encode(f, path.name, frames, source, quality)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a signal or an error: never leave the temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def encode_image(name: str, frames: list[np.ndarray], source: Picture, quality: int = 95) -> bytes:
    """The bytes write_image would write to a file called `name` (its suffix picks the format): for outputs that
    go to another filesystem."""
    check_output(Path(name), frames[0].shape[1:], frames[0].shape[0], len(frames))
    buffer = io.BytesIO()
    _encode(buffer, name, frames, source, quality)
    return buffer.getvalue()


def _encode(f, name: str, frames: list[np.ndarray], source: Picture, quality: int) -> None:
    """Encode into the open file `f` in the format `name`'s suffix picks: a 16-bit PNG for a 16-bit single
    frame going to PNG, else Pillow's writer; the source's EXIF (pixel size updated) and ICC profile carried."""
    fmt = output_format(name)
    exif = _exif_for(source.exif, frames[0].shape[1:])
    if source.bit_depth == 16 and fmt == "PNG" and len(frames) == 1:
        _write_png16(f, frames[0], source.icc_profile, exif)
    else:
        _save_with_pillow(f, fmt, [_to_pillow(a) for a in frames], source, exif, quality)


def _exif_for(exif: Image.Exif | None, size: tuple[int, int]) -> Image.Exif:
    out = Image.Exif()
    if exif:
        out.load(exif.tobytes())
        out[EXIF_ORIENTATION] = 1
        ifd = out.get_ifd(EXIF_IFD)
        if EXIF_PIXEL_X in ifd or EXIF_PIXEL_Y in ifd:
            ifd[EXIF_PIXEL_X], ifd[EXIF_PIXEL_Y] = size[1], size[0]
    out[EXIF_SOFTWARE] = SOFTWARE
    return out


def _to_pillow(array: np.ndarray) -> Image.Image:
    hwc = np.clip(np.rint(array.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[hwc.shape[2]]
    return Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc, mode)


def _save_with_pillow(f, fmt: str, images: list[Image.Image], source: Picture, exif: Image.Exif, quality: int) -> None:
    options: dict = {"exif": exif.tobytes()}
    if source.icc_profile:
        options["icc_profile"] = source.icc_profile
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", SOFTWARE)
        options["pnginfo"] = info
    elif fmt == "JPEG":
        options.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        options.update(quality=quality, lossless=quality >= 100)
    # TIFF is written uncompressed: Pillow's libtiff encoders (deflate, LZW) drop the EXIF sub-IFD.
    if len(images) > 1:
        options.update(save_all=True, append_images=images[1:], loop=source.loop)
        if source.durations:
            options["duration"] = source.durations
    images[0].save(f, format=fmt, **options)


def _write_png16(f, array: np.ndarray, icc: bytes | None, exif: Image.Exif) -> None:
    import zlib

    import png  # pypng

    channels, height, width = array.shape
    hwc = np.clip(np.rint(array.transpose(1, 2, 0) * 65535.0), 0, 65535).astype(np.uint16)
    buffer = io.BytesIO()
    png.Writer(width, height, greyscale=channels <= 2, alpha=channels in (2, 4), bitdepth=16, compression=6).write(
        buffer, hwc.reshape(height, width * channels))
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    extra = [(b"tEXt", b"Software\x00" + SOFTWARE.encode("latin-1")), (b"eXIf", exif.tobytes())]
    if icc:
        extra.insert(0, (b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    png.write_chunks(f, chunks[:1] + extra + chunks[1:])  # after IHDR, before the image data


def is_hypir_output(path: Path) -> bool:
    """Whether a file carries this tool's Software tag (a previous output, safe to replace)."""
    try:
        with Image.open(path) as img:
            software = str(img.info.get("Software") or img.getexif().get(EXIF_SOFTWARE) or "")
    except Exception:  # noqa: BLE001 - a file that is not a readable image is not ours
        return False
    return software.startswith("hypir ")


# ----------------------------------------------------------------------------------------------
# Files anywhere, and one file restored


def is_uri(name: str) -> bool:
    return "://" in name


def read_bytes(name: str) -> bytes:
    """A file's bytes from a local path or any filesystem pyarrow supports (s3://, gs://, hdfs://...)."""
    if not is_uri(name):
        return Path(name).read_bytes()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(name)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_output(name: str, frames, picture, quality: int) -> None:
    """Write an output atomically: locally through write_image, elsewhere under a temporary name that is then
    moved (an object store's move copies first, so a reader never sees half a file)."""
    if not is_uri(name):
        write_image(name, frames, picture, quality)
        return
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(name)
    data = encode_image(name, frames, picture, quality)
    folder, _, base = path.rpartition("/")
    tmp = f"{folder}/{partial_name(base)}" if folder else partial_name(base)
    with filesystem.open_output_stream(tmp) as stream:
        stream.write(data)
    filesystem.move(tmp, path)


def read_source(source: str | os.PathLike) -> Picture:
    """read_image of a local path or of any URI pyarrow reads."""
    source = str(source)
    return read_image(source, data=read_bytes(source)) if is_uri(source) else read_image(source)
