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
printed. Messages never quote the file's bytes (a symbolic link to a private file stays private).

Pixel limit: :func:`read_image` refuses an image with more than ``max_pixels`` pixels
(:data:`DEFAULT_MAX_PIXELS` unless told otherwise) from its header, before decoding: a small, highly
compressed file can otherwise ask for many gigabytes (a 328 KB tiled TIFF of 10000 x 10000 px).

Instance-ID masks (``classK.tif``) are float64 ``[H, W]``: 0 is background, every other integer value one
instance. :func:`read_id_mask` validates them (one page, finite, integer-valued, non-negative) without any
cast that could merge IDs (no uint8: IDs can exceed 255).
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
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

DEFAULT_MAX_PIXELS = 5000 * 5000
"""Largest image (height x width) read without being told otherwise: 25 megapixels.

Four times the largest image of the competition data (2500 px per side), so no real image comes near it;
the commands raise it with ``--max-pixels``. Memory of a prediction grows about linearly with the pixels.
"""

_log = logging.getLogger(__name__)


_BYTES_REPR = re.compile(r"""b(['"]).*?(?<!\\)\1""")


def _first_line(exc: BaseException) -> str:
    """The first line of an error message, with any quoted file bytes (``b'...'``) taken out."""
    text = str(exc).strip().splitlines()
    line = (text[0] if text else type(exc).__name__)[:160]
    return _without_bytes(line)


def _without_bytes(text: str) -> str:
    """``text`` with quoted bytes (``header=b'TOPS'``, ``b"..."``) replaced by ``<file bytes>``."""
    text = re.sub(r"\w+=b(['\"]).*?(?<!\\)\1", "<file bytes>", text)
    return _BYTES_REPR.sub("<file bytes>", text)


def _tiff_detail(exc: BaseException) -> str:
    """What tifffile said, in one line and without the file's bytes."""
    detail = _first_line(exc)
    if "not a TIFF file" in detail:
        return "not a TIFF file: it does not start with a TIFF header"
    return detail


def _pixel_limit_error(path: Path, height: int, width: int, max_pixels: int) -> DataError:
    return DataError(
        f"{path}: image is {height} x {width} px ({height * width / 1e6:.1f} megapixels), above the limit of "
        f"{max_pixels / 1e6:.1f} megapixels; pass --max-pixels {height * width} (or more) to read it "
        "(memory grows with the pixel count)"
    )


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


def _page_size(page: tifffile.TiffPage | tifffile.TiffFrame) -> tuple[int, int]:
    """``(H, W)`` of a TIFF page from its header (planar ``[C, H, W]`` and ``[H, W, C]`` alike)."""
    shaped = page.shaped  # (separate samples, depth, height, width, contig samples)
    return int(shaped[-3]), int(shaped[-2])


def _read_tiff(path: Path, max_pixels: int | None = None, single_page: bool = False) -> np.ndarray:
    """The first page of a TIFF as stored (any dtype, ``[H, W]``, ``[H, W, C]`` or planar ``[C, H, W]``).

    ``max_pixels`` is checked on the header before decoding; ``single_page`` refuses files with several pages.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _tifffile_messages() as messages:
        try:
            with tifffile.TiffFile(path) as tif:
                if not tif.pages:
                    raise DataError(f"{path}: TIFF holds no image")
                if single_page and len(tif.pages) > 1:
                    raise DataError(
                        f"{path}: TIFF holds {len(tif.pages)} pages, expected one (an H x W mask); save each "
                        "mask as a single-page TIFF"
                    )
                page = tif.pages[0]
                if max_pixels is not None:
                    height, width = _page_size(page)
                    if height * width > max_pixels:
                        raise _pixel_limit_error(path, height, width, max_pixels)
                _check_strips(path, page, path.stat().st_size)
                array = np.asarray(page.asarray())
        except DataError:
            raise
        except MemoryError as exc:
            raise DataError(f"{path}: not enough memory to decode this TIFF") from exc
        except Exception as exc:  # tifffile/imagecodecs raise many types for corrupt or truncated files
            detail = _tiff_detail(exc)
            if messages and messages[0] not in detail:
                detail += f"; {_without_bytes(messages[0][:120])}"
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


def _png_jpeg_size(path: Path, suffix: str) -> tuple[int, int] | None:
    """``(H, W)`` from a PNG's IHDR or a JPEG's SOF marker, without decoding; ``None`` when not found."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return None
    if suffix == ".png":
        if len(head) >= 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return int(height), int(width)
        return None
    pos = 2  # JPEG: walk the marker segments up to the first start-of-frame
    while pos + 9 <= len(head) and head[:2] == b"\xff\xd8":
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        length = struct.unpack(">H", head[pos + 2 : pos + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return int(height), int(width)
        pos += 2 + length
    return None


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB ``uint8 [H, W, 3]`` (conversions: see the module docstring).

    Args:
        path: a TIFF, PNG or JPEG file.
        max_pixels: refuse images with more than this many pixels (``H * W``), checked on the file's header
            before any decoding; ``None``: no limit.

    Raises:
        DataError: missing, unreadable, corrupt or truncated file, an unsupported layout, or more pixels than
            ``max_pixels`` (one line, naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        array = _read_tiff(path, max_pixels=max_pixels)
    elif suffix in (".png", ".jpg", ".jpeg"):
        size = _png_jpeg_size(path, suffix) if max_pixels is not None else None
        if size is not None and max_pixels is not None and size[0] * size[1] > max_pixels:
            raise _pixel_limit_error(path, size[0], size[1], max_pixels)
        array = _read_cv2(path, suffix)
    else:
        raise DataError(f"{path}: unsupported image type {suffix!r}; expected one of {list(IMAGE_SUFFIXES)}")
    return to_rgb_uint8(array, path)


def read_id_mask(path: str | Path) -> np.ndarray:
    """Read an instance-ID mask (TIFF) as float64 ``[H, W]`` and validate it.

    Returns:
        float64 ``[H, W]``: 0 background, each other value one instance (integer-valued, any size).

    Raises:
        DataError: unreadable / corrupt / truncated file, several pages, not 2-D, or IDs that are NaN,
            infinite, negative or not whole numbers (the message names the file, the first bad value and how many pixels hold one).
    """
    path = Path(path)
    ids = _read_tiff(path, single_page=True)
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
                    return _page_size(tif.pages[0])
            except Exception as exc:
                raise DataError(
                    f"{path}: cannot read TIFF header ({type(exc).__name__}: {_tiff_detail(exc)})"
                ) from exc
    if path.is_file() and (size := _png_jpeg_size(path, path.suffix.lower())) is not None:
        return size
    h, w = read_image(path, max_pixels=None).shape[:2]
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
