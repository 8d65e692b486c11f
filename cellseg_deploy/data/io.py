"""Reading and writing images and instance-ID masks in the users' formats.

Images are returned as RGB ``uint8 [H, W, 3]`` whatever they were on disk:

==============================  =========================================================================
on disk                         conversion
==============================  =========================================================================
RGBA (the competition data)     alpha dropped, never composited (it is constant 255 in the real data)
RGB, 8-bit                      unchanged
grayscale ``[H, W]`` or 1-ch    replicated to three channels
2-channel (gray + alpha)        gray replicated, alpha dropped
planar ``[C, H, W]`` (C 1/3/4)  moved to channels-last first
16-bit unsigned integer         ``v // 257`` (``65535 -> 255``; exact for 8-bit data stored as ``v * 257``)
bool                            ``True -> 255``
other integer (int16, uint32)   kept if every value lies in 0..255, otherwise min-max scaled to 0..255
float                           values in [0, 1] scaled by 255; in [0, 255] rounded; otherwise min-max
                                scaled to 0..255; NaN or infinite values are an error
==============================  =========================================================================

The 16-bit rule is a fixed scale, not a per-image stretch, so the same stain gives the same colour in every
image (a per-image min-max would not). Its cost: 12-bit data stored in 16 bits (values up to 4095) comes out
dark (at most 15); rescale such images to the full 16-bit range, or to 8 bits, before using them.

TIFF is read with ``tifffile`` (LZW through ``imagecodecs``), first page only; PNG and JPEG with OpenCV
(converted BGR -> RGB). A missing, unreadable, corrupt or truncated file raises :class:`DataError` with one
line naming the file. TIFFs whose image data runs past the end of the file are reported as truncated before
any decoding; messages that tifffile logs while reading a bad file are folded into that line instead of being
printed.

Instance-ID masks (``classK.tif``) are float64 ``[H, W]``: 0 is background, every other integer value one
instance. :func:`read_id_mask` validates them (finite, integer-valued, non-negative) without any cast that
could merge IDs (no uint8: IDs can exceed 255).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile

from cellseg_deploy.errors import DataError

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""File suffixes :func:`read_image` accepts (case-insensitive)."""

IMAGE_ROWS_PER_STRIP = 4
"""Rows per TIFF strip of ``image.tif`` as in the real data (``classK.tif`` use 2)."""

MASK_ROWS_PER_STRIP = 2

_log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(
            record.getMessage().strip().splitlines()[0] if record.getMessage().strip() else ""
        )


@contextlib.contextmanager
def _tifffile_messages() -> Iterator[list[str]]:
    """Collect what the ``tifffile`` logger says during one read (instead of printing it to stderr).

    Only the ``tifffile`` logger is touched, only for the duration of the read, and it is restored after.
    """
    logger = logging.getLogger("tifffile")
    handler = _Capture()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _check_strips(path: Path, page: tifffile.TiffPage | tifffile.TiffFrame, file_size: int) -> None:
    """Raise if the page's image data (strips or tiles) extends past the end of the file."""
    offsets, counts = page.dataoffsets, page.databytecounts
    if not offsets or not counts:
        raise DataError(
            f"{path}: cannot decode TIFF (its header lists no image data: truncated or corrupt file)"
        )
    end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False))
    if end > file_size:
        raise DataError(
            f"{path}: truncated TIFF (the image data needs {end} bytes, the file has {file_size}); "
            "copy or re-export the file again"
        )


def _read_tiff(path: Path) -> np.ndarray:
    """The first page of a TIFF as stored (any dtype, ``[H, W]``, ``[H, W, C]`` or planar ``[C, H, W]``)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _tifffile_messages() as messages:
        try:
            with tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise DataError(f"{path}: TIFF holds no image")
                page = tif.pages[0]
                _check_strips(path, page, path.stat().st_size)
                array = np.asarray(page.asarray())
        except DataError:
            raise
        except Exception as exc:  # tifffile/imagecodecs raise many types for corrupt or truncated files
            detail = _first_line(exc)
            if messages and messages[0] not in detail:
                detail += f"; {messages[0][:120]}"
            raise DataError(f"{path}: cannot decode TIFF ({type(exc).__name__}: {detail})") from exc
    for message in messages:  # the read worked: keep tifffile's remarks available, without the noise
        _log.debug("%s: %s", path, message)
    return array


def to_rgb_uint8(array: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
    """Convert an image array (see the module table) to RGB ``uint8 [H, W, 3]``, C-contiguous.

    Raises:
        DataError: a shape that is not an image, an empty image, or NaN / infinite values.
    """
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W) layout
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise DataError(
            f"{path}: expected an image of shape HxW, HxWx3 or HxWx4, got {list(np.shape(array))}"
        )
    if a.shape[2] in (2, 4):
        a = a[:, :, :-1]  # drop alpha
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return np.ascontiguousarray((a // 257).astype(np.uint8))
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a.astype(np.uint8) * 255)
    f = a.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise DataError(f"{path}: image holds NaN or infinite values")
    lo, hi = float(f.min()), float(f.max())
    if np.issubdtype(a.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        f = f * 255.0
    elif lo < 0.0 or hi > 255.0:
        f = (f - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(f)
    return np.ascontiguousarray(np.clip(np.rint(f), 0, 255).astype(np.uint8))


def _read_cv2(path: Path, suffix: str) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({_first_line(exc)})") from exc
    if suffix in (".jpg", ".jpeg") and data.size and b"\xff\xd9" not in data[-1024:].tobytes():
        raise DataError(f"{path}: truncated JPEG (no end-of-image marker); copy or re-export the file again")
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        raise DataError(f"{path}: cannot decode image (corrupt or truncated {suffix} file)")
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    return np.asarray(array)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB ``uint8 [H, W, 3]`` (conversions: see the module docstring).

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
        array = _read_cv2(path, suffix)
    else:
        raise DataError(f"{path}: unsupported image type {suffix!r}; expected one of {list(IMAGE_SUFFIXES)}")
    return to_rgb_uint8(array, path)


def read_id_mask(path: str | Path) -> np.ndarray:
    """Read an instance-ID mask (TIFF) as float64 ``[H, W]`` and validate it.

    Returns:
        float64 ``[H, W]``: 0 background, each other value one instance (integer-valued, any size).

    Raises:
        DataError: unreadable / corrupt / truncated file, not 2-D, or IDs that are NaN, infinite, negative or
            not whole numbers (the message names the file, the first bad value and how many pixels hold one).
    """
    path = Path(path)
    ids = _read_tiff(path)
    if ids.ndim == 3 and ids.shape[2] == 1:
        ids = ids[:, :, 0]
    if ids.ndim != 2:
        raise DataError(f"{path}: an instance-ID mask must be 2-D (H x W), got shape {list(ids.shape)}")
    if np.issubdtype(ids.dtype, np.complexfloating):
        raise DataError(
            f"{path}: instance IDs are complex numbers ({ids.dtype}); expected float64 or integers"
        )
    ids = ids.astype(np.float64, copy=False)
    finite = np.isfinite(ids)
    if not finite.all():
        n = int((~finite).sum())
        raise DataError(
            f"{path}: {n} pixel(s) hold NaN or infinite instance IDs; IDs must be integers >= 0 (0 = background)"
        )
    negative = ids < 0
    if negative.any():
        raise DataError(
            f"{path}: {int(negative.sum())} pixel(s) hold negative instance IDs (e.g. {ids[negative][0]:g}); "
            "IDs must be integers >= 0 (0 = background)"
        )
    fractional = ids != np.floor(ids)
    if fractional.any():
        raise DataError(
            f"{path}: {int(fractional.sum())} pixel(s) hold non-integer instance IDs (e.g. {ids[fractional][0]:g}); "
            "IDs must be whole numbers"
        )
    return ids


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file; TIFFs are measured from their header without decoding the pixels.

    Raises:
        DataError: the file is missing or unreadable.
    """
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff") and path.is_file():
        with _tifffile_messages():
            try:
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    return int(page.shaped[-3]), int(page.shaped[-2])
            except Exception as exc:
                raise DataError(
                    f"{path}: cannot read TIFF header ({type(exc).__name__}: {_first_line(exc)})"
                ) from exc
    h, w = read_image(path).shape[:2]
    return int(h), int(w)


def write_image_tif(path: str | Path, rgb: np.ndarray) -> None:
    """Write RGB ``uint8 [H, W, 3]`` as the competition stores images: RGBA uint8 (alpha 255), LZW with the
    horizontal predictor, 4 rows per strip. Deterministic bytes (no timestamp, software or description tag).

    One difference from the real files: they carry no ``ExtraSamples`` tag (a 4-sample RGB image without it
    is technically malformed, hence OpenCV's warning); tifffile always writes one, here "unassociated alpha".
    Readers (tifffile, OpenCV, PIL) decode both the same.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"write_image_tif expects uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    tifffile.imwrite(
        path,
        rgba,
        photometric="rgb",
        compression="lzw",
        predictor=True,
        extrasamples=["unassalpha"],
        rowsperstrip=IMAGE_ROWS_PER_STRIP,
        metadata=None,
        software=False,
    )


def write_id_mask_tif(path: str | Path, ids: np.ndarray) -> None:
    """Write an instance-ID mask ``[H, W]`` as float64, uncompressed, 2 rows per strip (the real ``classK.tif``).

    The values are written as given (NaN, negative or fractional values too: tests use this to make defects).
    """
    if ids.ndim != 2:
        raise ValueError(f"write_id_mask_tif expects [H, W], got {list(ids.shape)}")
    tifffile.imwrite(
        path,
        ids.astype(np.float64),
        photometric="minisblack",
        rowsperstrip=MASK_ROWS_PER_STRIP,
        metadata=None,
        software=False,
    )
