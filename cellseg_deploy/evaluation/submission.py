"""The competition submission: ``test-results.json`` inside a zip.

Format (the competition's example ``submission_example.zip``): a zip whose only member, at its root, is
``test-results.json`` (deflated), a JSON list of objects with keys ``image_id`` (int), ``bbox``
(4 floats), ``score`` (float), ``category_id`` (int 1..4) and ``segmentation``
(``{"size": [H, W], "counts": str}``, a compressed COCO RLE at the original resolution).

``bbox`` is written as COCO ``[x, y, w, h]`` of the detector's box (facts.md, COCO results format). The
competition's own example file holds ``x1, y1, x2, y2`` values under that key; the competition metric is
segmentation AP, which never reads ``bbox``, so either convention scores the same there.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cellseg_deploy.errors import DataError
from cellseg_deploy.io_utils import atomic_path, atomic_write_bytes

RESULTS_MEMBER = "test-results.json"
"""Name of the results file inside the submission zip."""

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
"""The timestamp of the zip member (the zip format's earliest), so identical results give identical bytes."""

RESULT_KEYS: tuple[str, ...] = ("image_id", "bbox", "score", "category_id", "segmentation")
"""Keys of every result, in the example's order."""


def validate_results(results: Sequence[dict[str, Any]], num_classes: int = 4) -> None:
    """Check every result against the competition format; raise :class:`DataError` naming the first bad one."""
    for i, r in enumerate(results):
        where = f"result {i} (image_id {r.get('image_id')!r})"
        if set(r) != set(RESULT_KEYS):
            raise DataError(f"{where}: keys {sorted(r)}, expected {sorted(RESULT_KEYS)}")
        if not isinstance(r["image_id"], int) or isinstance(r["image_id"], bool):
            raise DataError(f"{where}: image_id must be an int, got {type(r['image_id']).__name__}")
        if not isinstance(r["category_id"], int) or not 1 <= r["category_id"] <= num_classes:
            raise DataError(
                f"{where}: category_id must be an int in 1..{num_classes}, got {r['category_id']!r}"
            )
        if not isinstance(r["score"], float):
            raise DataError(f"{where}: score must be a float, got {type(r['score']).__name__}")
        bbox = r["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, float) for v in bbox):
            raise DataError(f"{where}: bbox must be a list of 4 floats, got {bbox!r}")
        seg = r["segmentation"]
        if (
            not isinstance(seg, dict)
            or set(seg) != {"size", "counts"}
            or not isinstance(seg["counts"], str)
            or not isinstance(seg["size"], list)
            or len(seg["size"]) != 2
            or not all(isinstance(v, int) and v > 0 for v in seg["size"])
        ):
            raise DataError(
                f"{where}: segmentation must be {{'size': [H, W], 'counts': str}}, got {str(seg)[:80]}"
            )


def write_submission(results: Sequence[dict[str, Any]], out_zip: str | Path) -> Path:
    """Write ``results`` as ``test-results.json`` inside ``out_zip`` (atomically) and return ``out_zip``.

    The results are validated first (:func:`validate_results`); an empty list is a valid submission
    (no detections). The same results always give the same bytes (:data:`ZIP_DATE_TIME`). The JSON is compact (one line): test sets with hundreds of detections per image
    make indented JSON several times larger for nothing.
    """
    validate_results(results)
    out_zip = Path(out_zip)
    # A fixed member timestamp: the same results give the same zip bytes (a run split over torchrun ranks, a
    # pipelined run and a sequential one can be compared with a checksum).
    member = zipfile.ZipInfo(RESULTS_MEMBER, date_time=ZIP_DATE_TIME)
    member.compress_type = zipfile.ZIP_DEFLATED
    member.external_attr = 0o644 << 16
    with atomic_path(out_zip) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, results_to_json(results))
    return out_zip


def write_results_json(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``results`` as a bare ``test-results.json`` (the same bytes as inside the zip), atomically."""
    validate_results(results)
    return atomic_write_bytes(path, results_to_json(results))


def results_to_json(results: Sequence[dict[str, Any]]) -> bytes:
    """The bytes of ``test-results.json``: a compact UTF-8 JSON list."""
    return json.dumps(list(results)).encode("utf-8")


def read_submission(zip_path: str | Path) -> list[dict[str, Any]]:
    """The results list of a submission zip; :class:`DataError` when it is not a valid submission."""
    zip_path = Path(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = zf.namelist()
            if RESULTS_MEMBER not in names:
                raise DataError(f"{zip_path}: no {RESULTS_MEMBER} at the zip's root (members: {names[:5]})")
            results = json.loads(zf.read(RESULTS_MEMBER))
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DataError(f"{zip_path}: not a readable submission zip ({exc})") from exc
    if not isinstance(results, list):
        raise DataError(f"{zip_path}: {RESULTS_MEMBER} must hold a JSON list, got {type(results).__name__}")
    return results
