"""Decode image files into float32 H×W×C arrays in [0, 1], and resize them.

Mode policy (what `decode_image` does with each PIL mode):

- `1`, `L`: grayscale, one channel (1-bit becomes 0 or 1).
- `I;16*`: 16-bit grayscale, divided by 65535.
- `I` (32-bit integer; some readers return 16-bit PNG/TIFF this way): values in 0..65535 are
  divided by 65535; anything outside that range is rescaled like `F` below.
- `F` (float TIFF): kept as is when every value lies in [0, 1]; otherwise rescaled linearly from
  the image's own [min, max] to [0, 1] (a constant image becomes 0). NaN or inf is an error.
- `P` (palette): expanded through its palette; a palette whose entries are all gray gives one
  channel, any colour gives three.
- `RGB`; `CMYK`, `YCbCr`, `LAB`, `HSV` are converted to RGB by PIL.
- Alpha (`LA`, `PA`, `RGBA`, palette transparency) follows `DataConfig.alpha`: `drop` ignores it,
  `composite_black` / `composite_white` blend the image over a black or white background. The
  default is black because the medical and industrial images we target are dark-background.
- EXIF orientation is applied first (`PIL.ImageOps.exif_transpose`), so pixels are upright.

DICOM files (the `DICM` marker, or a `.dcm`/`.dicom` name) are read by `vision_si.data.dicom` (pydicom,
the `dicom` extra) with its own policy for bit depth, rescale, window and photometric interpretation;
`decode_array` picks the reader.

Files larger than `MAX_PIXELS` pixels are refused before their pixels are decoded (decompression
bombs), as are files that PIL itself flags as bombs. Empty, truncated and non-image files raise a
`DataError` naming the file and the problem.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vision_si.config import DicomConfig
from vision_si.data.dicom import DICOM_EXTENSIONS, is_dicom, read_dicom
from vision_si.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_EXTENSIONS)
MAX_PIXELS = 64_000_000  # 8000×8000; larger files are refused as possible decompression bombs
ALPHA_POLICIES = ("drop", "composite_black", "composite_white")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, the weights PIL's "L" uses
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def open_image(data: bytes, name: str) -> Image.Image:
    """Open, bomb-check, fully decode and orient an image; every failure is a `DataError` naming `name`."""
    if not data:
        raise DataError(f"{name}: empty file (0 bytes), not an image")
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; a warning is a refusal here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise DataError(f"{name}: {w}x{h} = {w * h} pixels is above the limit of {MAX_PIXELS} "
                                "(refused as a possible decompression bomb)")
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            # PIL checks its own, larger limit while opening; the message quotes the one documented here
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{found.group(1)} pixels" if found else "its size"
            raise DataError(f"{name}: {size} is above the limit of {MAX_PIXELS} pixels "
                            "(refused as a possible decompression bomb)") from None
        except UnidentifiedImageError:
            raise DataError(f"{name}: not an image PIL can read (unknown or corrupt format)") from None
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # PIL reports truncation and broken streams through several exception types.
            raise DataError(f"{name}: cannot decode the image, the file is truncated or corrupt ({exc})") from None
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:  # a malformed EXIF block should not pass silently either
        raise DataError(f"{name}: cannot apply the EXIF orientation ({exc})") from None


def _rescale_out_of_range(arr: np.ndarray, name: str, lo: float, hi: float) -> np.ndarray:
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"{name}: the image contains NaN or infinite values")
    if arr.size and arr.min() >= lo and arr.max() <= hi:
        return (arr - lo) / (hi - lo)
    span = float(arr.max() - arr.min()) if arr.size else 0.0
    return (arr - arr.min()) / span if span > 0 else np.zeros_like(arr)


def _gray_palette(im: Image.Image) -> bool:
    pal = np.asarray(im.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    used = np.unique(np.asarray(im)) if pal.size else np.zeros(0, dtype=np.int64)
    used = used[used < len(pal)]
    return bool(np.all(pal[used, 0] == pal[used, 1]) and np.all(pal[used, 1] == pal[used, 2]))


def image_to_array(im: Image.Image, alpha: str = "composite_black", name: str = "image") -> np.ndarray:
    """PIL image → float32 H×W×C in [0, 1] with the image's own channels (1 or 3); see the module doc."""
    if alpha not in ALPHA_POLICIES:
        raise ValueError(f"alpha must be one of {ALPHA_POLICIES}, got {alpha!r}")
    mode = im.mode
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        gray = _gray_palette(im)
        im = im.convert(("LA" if gray else "RGBA") if has_alpha else ("L" if gray else "RGB"))
        mode = im.mode
    elif mode in _TO_RGB:
        im, mode = im.convert("RGB"), "RGB"
    elif mode in ("RGBa", "La"):
        im = im.convert(mode.upper())
        mode = im.mode
    elif mode == "1":
        im, mode = im.convert("L"), "L"

    if mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(im, dtype=np.float32) / 255.0
    elif mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float32) / 65535.0
    elif mode == "I":
        arr = _rescale_out_of_range(np.asarray(im), name, 0.0, 65535.0).astype(np.float32)
    elif mode == "F":
        arr = _rescale_out_of_range(np.asarray(im), name, 0.0, 1.0).astype(np.float32)
    else:
        raise DataError(f"{name}: unsupported image mode {mode!r}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if mode in ("LA", "RGBA"):
        colour, a = arr[:, :, :-1], arr[:, :, -1:]
        if alpha == "composite_black":
            colour = colour * a
        elif alpha == "composite_white":
            colour = colour * a + (1.0 - a)
        arr = colour
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


def convert_channels(arr: np.ndarray, channels: int | None) -> np.ndarray:
    """H×W×C → H×W×channels: colour to gray by BT.601 luma, gray to colour by repetition."""
    have = arr.shape[2]
    if channels is None or channels == have:
        return arr
    if channels == 1 and have == 3:
        return np.ascontiguousarray((arr @ _LUMA)[:, :, None], dtype=np.float32)
    if channels == 3 and have == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    raise ValueError(f"cannot convert {have} channels to {channels}; allowed: 1 or 3")


def decode_array(data: bytes, name: str, alpha: str = "composite_black",
                 dicom: DicomConfig | None = None) -> np.ndarray:
    """A file's bytes → float32 H×W×C in [0, 1] with the image's own channels; DICOM or anything PIL reads."""
    if is_dicom(data, name):
        return read_dicom(data, name, dicom)
    return image_to_array(open_image(data, name), alpha, name)


def decode_image(path_or_bytes: str | Path | bytes, channels: int | None = None,
                 alpha: str = "composite_black", *, name: str | None = None,
                 dicom: DicomConfig | None = None) -> np.ndarray:
    """A file (path or its bytes) → float32 H×W×C in [0, 1]; `channels` None keeps the image's own.
    `dicom` sets the window of DICOM files (default: the file's own)."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, label = bytes(path_or_bytes), name or "<bytes>"
    else:
        data, label = read_bytes(path_or_bytes), name or str(path_or_bytes)
    return convert_channels(decode_array(data, label, alpha, dicom), channels)


def resize_image(arr: np.ndarray, size: int, policy: str = "resize") -> np.ndarray:
    """H×W×C float32 → size×size×C, antialiased (PIL bicubic on each channel, then clipped to [0, 1]).

    `resize` stretches to a square (aspect ratio not kept); `resize_crop` scales the shorter side to
    `size` and keeps the centre square (`PIL.ImageOps.fit`).
    """
    if policy not in ("resize", "resize_crop"):
        raise ValueError(f"resize policy must be 'resize' or 'resize_crop', got {policy!r}")
    h, w, c = arr.shape
    if (h, w) == (size, size):
        return np.ascontiguousarray(arr, dtype=np.float32)
    out = np.empty((size, size, c), dtype=np.float32)
    for k in range(c):
        plane = Image.fromarray(np.ascontiguousarray(arr[:, :, k], dtype=np.float32))  # float32 → mode F
        if policy == "resize":
            plane = plane.resize((size, size), Image.Resampling.BICUBIC)
        else:
            plane = ImageOps.fit(plane, (size, size), method=Image.Resampling.BICUBIC)
        out[:, :, k] = np.asarray(plane, dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)
