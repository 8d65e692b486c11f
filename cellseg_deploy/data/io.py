"""Reading and writing images and instance-ID masks in the users' formats.

Images are returned as RGB ``uint8 [H, W, 3]`` whatever they were on disk:

============================  ===========================================================================
on disk                       conversion
============================  ===========================================================================
RGBA (the competition data)   alpha dropped (it is constant 255 in the real data)
RGB, 8-bit                    unchanged
grayscale ``[H, W]`` or 1-ch  replicated to three channels
2-channel (gray + alpha)      gray replicated, alpha dropped
16-bit integer                divided by 257 (``65535 -> 255``, exact for values written as ``v * 257``)
other integer / float         float in [0, 1] scaled by 255; otherwise min-max scaled to [0, 255]
============================  ===========================================================================

TIFF is read with ``tifffile`` (LZW through ``imagecodecs``); PNG and JPEG with OpenCV (converted BGR -> RGB).

Instance-ID masks (``classK.tif``) are float64 ``[H, W]``: 0 is background, every other integer value one
instance. :func:`read_id_mask` validates them (finite, integer-valued, non-negative) without any cast that could
merge IDs (no uint8: IDs can exceed 255).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

from cellseg_deploy.errors import DataError

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _read_tiff(path: Path) -> np.ndarray:
    try:
        return np.asarray(tifffile.imread(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # tifffile/imagecodecs raise many types for corrupt or truncated files
        raise DataError(f"{path}: cannot decode TIFF ({type(exc).__name__}: {_first_line(exc)})") from exc


def to_rgb_uint8(array: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
    """Convert an image array (see the module table) to RGB ``uint8 [H, W, 3]``."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W) layout
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise DataError(f"{path}: expected an image of shape HxW, HxWx3 or HxWx4, got {list(np.shape(array))}")
    if a.shape[2] in (2, 4):
        a = a[:, :, :-1]  # drop alpha
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return np.ascontiguousarray((a.astype(np.uint32) // 257).astype(np.uint8))
    f = a.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise DataError(f"{path}: image holds NaN or infinite values")
    if f.min() >= 0.0 and f.max() <= 1.0 and np.issubdtype(a.dtype, np.floating):
        f = f * 255.0
    elif f.min() < 0.0 or f.max() > 255.0:
        lo, hi = float(f.min()), float(f.max())
        f = (f - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(f)
    return np.ascontiguousarray(np.clip(np.rint(f), 0, 255).astype(np.uint8))


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB ``uint8 [H, W, 3]``.

    Raises:
        DataError: missing, unreadable, corrupt or truncated file, or an unsupported layout (one line, naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        array = _read_tiff(path)
    elif suffix in (".png", ".jpg", ".jpeg"):
        data = np.fromfile(path, dtype=np.uint8)
        array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if array is None:
            raise DataError(f"{path}: cannot decode image (corrupt or truncated {suffix} file)")
        if array.ndim == 3 and array.shape[2] == 3:
            array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
        elif array.ndim == 3 and array.shape[2] == 4:
            array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    else:
        raise DataError(f"{path}: unsupported image type {suffix!r}; expected one of {list(IMAGE_SUFFIXES)}")
    return to_rgb_uint8(array, path)


def read_id_mask(path: str | Path) -> np.ndarray:
    """Read an instance-ID mask as float64 ``[H, W]`` and validate it.

    Raises:
        DataError: unreadable file, not 2-D, or IDs that are NaN, infinite, negative or not integers.
    """
    path = Path(path)
    ids = _read_tiff(path)
    if ids.ndim == 3 and ids.shape[2] == 1:
        ids = ids[:, :, 0]
    if ids.ndim != 2:
        raise DataError(f"{path}: an instance-ID mask must be 2-D (H x W), got shape {list(ids.shape)}")
    ids = ids.astype(np.float64, copy=False)
    if not np.all(np.isfinite(ids)):
        raise DataError(f"{path}: instance IDs include NaN or infinite values; IDs must be integers >= 0")
    if ids.min(initial=0.0) < 0:
        raise DataError(f"{path}: negative instance ID {ids.min():g}; IDs must be integers >= 0 (0 = background)")
    if not np.all(ids == np.floor(ids)):
        bad = ids[ids != np.floor(ids)][0]
        raise DataError(f"{path}: non-integer instance ID {bad:g}; IDs must be whole numbers")
    return ids


def write_image_tif(path: str | Path, rgb: np.ndarray) -> None:
    """Write RGB ``uint8 [H, W, 3]`` as the competition stores images: RGBA uint8, alpha 255, LZW with
    horizontal predictor. Deterministic bytes (no timestamp, no description)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_image_tif expects uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    tifffile.imwrite(
        path, rgba, photometric="rgb", compression="lzw", predictor=True, extrasamples=["unassalpha"],
        metadata=None, software=False,
    )


def write_id_mask_tif(path: str | Path, ids: np.ndarray) -> None:
    """Write an instance-ID mask as float64 ``[H, W]``, uncompressed (the competition's ``classK.tif``)."""
    if ids.ndim != 2:
        raise ValueError(f"write_id_mask_tif expects [H, W], got {list(ids.shape)}")
    tifffile.imwrite(path, ids.astype(np.float64), photometric="minisblack", metadata=None, software=False)
