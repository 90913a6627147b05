"""DICOM files → float32 H×W×C in [0, 1], with pydicom (the `dicom` extra).

A file is read as DICOM when its bytes carry the `DICM` marker at offset 128, or its name ends in
`.dcm`/`.dicom` (files written without the 128-byte preamble). What `read_dicom` does, in order:

1. **Refusals.** No pixel data (a structured report, a plan), more than one frame, or more than
   `decode.MAX_PIXELS` pixels is a `DataError` naming the file. Multi-frame files (cine, volumes,
   NumberOfFrames > 1) are refused on purpose rather than reduced to their first frame: which
   frame or slice stands for the study is the user's decision (split them into single-frame files).
2. **Decompression.** Compressed transfer syntaxes go through pydicom's decoders: RLE and deflate
   decode with pydicom alone, JPEG 2000 and baseline JPEG with Pillow (a core dependency), JPEG-LS
   and lossless JPEG need `pylibjpeg` + `pylibjpeg-libjpeg`, `python-gdcm` or `pyjpegls`. When no
   installed package decodes a file, the `DataError` names the file, its transfer syntax and the
   packages that would.
3. **Grey images** (MONOCHROME1/2): the modality transform first (`RescaleSlope`/`RescaleIntercept`
   or a modality LUT, pydicom's `apply_modality_lut`: stored values become Hounsfield units for CT),
   then the window `DataConfig.dicom.window` chooses:
   - `file` (default): the file's first VOI LUT, else its first `WindowCenter`/`WindowWidth` (with
     its `VOILUTFunction`), applied by pydicom; a file with neither falls back to `bits`;
   - `bits`: the whole range the stored bits can hold (`BitsStored`, `PixelRepresentation`),
     through the same rescale: the same scale for every file of a series;
   - `minmax`: each image's own minimum and maximum (contrast stretched per image);
   - `manual`: `data.dicom.center` and `data.dicom.width` in modality units (e.g. a lung window
     -600/1500 HU), applied by pydicom as a linear window.
   Values are then scaled to [0, 1] from the window's output range. MONOCHROME1 (bright = low
   values, some radiographs) is inverted afterwards, so every grey image reads as MONOCHROME2.
4. **Colour** (RGB; YBR, converted to RGB by pydicom; PALETTE COLOR through its lookup table):
   divided by the largest value its bits can hold; windows do not apply.

pydicom is imported only when a DICOM file is met; without it that file is a `ConfigError` (an
environment problem, not a bad image, so `on_bad_image: skip` does not hide it) with the install hint.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from vision_si.config import DicomConfig
from vision_si.errors import ConfigError, DataError

DICOM_EXTENSIONS = (".dcm", ".dicom")
DICOM_INSTALL = "`pip install pydicom` (in a checkout: `pip install -e '.[dicom]'`)"
_GREY = ("MONOCHROME1", "MONOCHROME2")


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM by its marker (`DICM` after the 128-byte preamble) or, for files without one, by extension."""
    return data[128:132] == b"DICM" or str(name).lower().endswith(DICOM_EXTENSIONS)


def import_pydicom(name: str) -> Any:
    try:
        import pydicom
    except ImportError:
        raise ConfigError(f"{name}: a DICOM file needs pydicom, which is not installed: {DICOM_INSTALL}") from None
    return pydicom


def read_dataset(data: bytes, name: str, *, header_only: bool = False) -> Any:
    """The pydicom `Dataset` of a file's bytes; a file pydicom cannot parse is a `DataError` naming it."""
    pydicom = import_pydicom(name)
    try:
        return pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM",
                               stop_before_pixels=header_only)
    except Exception as exc:  # pydicom raises many types for damaged files (InvalidDicomError, EOFError, ...)
        raise DataError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None


def _check_decodable(ds: Any, name: str) -> None:
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None or not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DataError(f"{name}: pixel data in transfer syntax {uid.name} ({uid}), which pydicom cannot "
                        "decode") from None
    if not decoder.is_available:
        raise DataError(f"{name}: pixel data compressed as {uid.name} ({uid}) and no installed package decodes "
                        f"it; install one of: {'; '.join(decoder.missing_dependencies)} "
                        "(PyPI names: python-gdcm, pylibjpeg with pylibjpeg-libjpeg, pyjpegls)")


def _output_range(ds: Any) -> tuple[float, float]:
    """The range pydicom's `apply_windowing` maps a window onto: what the stored bits can hold, after the
    modality transform. The same range is the `bits` window."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    lo, hi = (0.0, 2.0**bits - 1) if int(ds.get("PixelRepresentation", 0)) == 0 \
        else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def _grey(arr: np.ndarray, ds: Any, cfg: DicomConfig, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    modality = apply_modality_lut(arr, ds)
    values = modality.astype(np.float64)
    window = cfg.window
    if window == "file" and not (ds.get("VOILUTSequence") or "WindowCenter" in ds):
        window = "bits"
    if window == "minmax" or "BitsStored" not in ds:
        out = _scale(values, float(values.min()), float(values.max()))
    elif window == "bits":
        out = _scale(values, *_output_range(ds))
    elif window == "file" and ds.get("VOILUTSequence"):
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = _scale(apply_voi(modality, ds, index=0).astype(np.float64), 0.0, 2.0**lut_bits - 1)
    else:
        if window == "manual":  # a window of our own, applied by the same code as a file's (linear)
            ds = ds.copy()
            ds.WindowCenter, ds.WindowWidth = float(cfg.center), float(cfg.width)
            ds.VOILUTFunction = "LINEAR"
        try:
            out = _scale(apply_windowing(values, ds, index=0), *_output_range(ds))
        except (ValueError, TypeError, IndexError) as exc:
            raise DataError(f"{name}: cannot apply the file's window (WindowCenter/WindowWidth): {exc}; set "
                            "data.dicom.window to bits, minmax or manual") from None
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1.0 - out
    return out[:, :, None]


def _colour(arr: np.ndarray, ds: Any, name: str) -> np.ndarray:
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    elif arr.ndim == 3 and arr.shape[2] == 3 and (photometric == "RGB" or photometric.startswith("YBR")):
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)  # pixel_array has converted YBR to RGB
    else:
        raise DataError(f"{name}: photometric interpretation {photometric!r} with pixel array shape "
                        f"{arr.shape} is not supported (allowed: MONOCHROME1, MONOCHROME2, RGB, YBR_*, PALETTE COLOR)")
    return arr.astype(np.float64) / (2.0**bits - 1)


def read_dicom(data: bytes, name: str, cfg: DicomConfig | None = None) -> np.ndarray:
    """A DICOM file's bytes → float32 H×W×C in [0, 1] (C = 1 grey, 3 colour); see the module doc."""
    from vision_si.data.decode import MAX_PIXELS

    cfg = cfg or DicomConfig()
    ds = read_dataset(data, name)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        kind = ds.get("Modality") or ds.get("SOPClassUID", "unknown")
        raise DataError(f"{name}: DICOM file without pixel data (modality/class {kind}); not an image")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DataError(f"{name}: multi-frame DICOM ({frames} frames) is not supported; vision_si reads one image "
                        "per file and does not pick a frame for you: split it into single-frame files")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise DataError(f"{name}: {cols}x{rows} = {rows * cols} pixels is above the limit of {MAX_PIXELS} "
                        "(refused as a possible decompression bomb)")
    _check_decodable(ds, name)
    try:
        arr = ds.pixel_array  # YBR is converted to RGB here
    except Exception as exc:  # truncated or inconsistent pixel data; decoders raise assorted types
        raise DataError(f"{name}: cannot decode the DICOM pixel data ({type(exc).__name__}: {exc})") from None
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    out = _grey(arr, ds, cfg, name) if photometric in _GREY else _colour(arr, ds, name)
    if not np.isfinite(out).all():
        raise DataError(f"{name}: the DICOM pixel data contains NaN or infinite values")
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def dicom_attribute(path: str | Path, keyword: str) -> str | None:
    """The value of the header attribute `keyword` (e.g. PatientID) of a DICOM file, as text; None when
    absent or empty. Only the header is read."""
    from vision_si.data.decode import read_bytes

    import_pydicom(str(path))
    from pydicom.datadict import tag_for_keyword

    if tag_for_keyword(keyword) is None:
        close = _close_keywords(keyword)
        raise ConfigError(f"data.split.group_by: '{keyword}' is not a DICOM keyword"
                          + (f"; did you mean {', '.join(close)}?" if close else " (e.g. PatientID)"))
    data = read_bytes(path)
    if not is_dicom(data, str(path)):
        raise DataError(f"{path}: not a DICOM file, so it has no '{keyword}' to group by "
                        f"(data.split.group_by: dicom:{keyword} needs every image to be DICOM)")
    value = read_dataset(data, str(path), header_only=True).get(keyword)
    text = "" if value is None else str(value).strip()
    return text or None


def _close_keywords(keyword: str) -> list[str]:
    import difflib

    from pydicom.datadict import keyword_dict

    words = [k for k in keyword_dict if re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", k)]
    return difflib.get_close_matches(keyword, words, n=2, cutoff=0.7)
