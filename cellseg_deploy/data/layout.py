"""The dataset layout users bring, read into :class:`Sample` objects (torch-free)::

    <root>/
      train/<id>/image.tif                 RGBA LZW uint8
                 class1.tif ... class4.tif float64 instance-ID masks, only the classes present
      test_release/<name>.tif              test images
      test_image_name_to_ids.json          [{"file_name", "id", "height", "width"}, ...]
      test_ground_truth.json               (synthetic sets only) COCO ground truth of the test images

Instances come from the ID values (``np.unique``), never from connected components and never through a uint8
cast: touching cells stay separate and IDs above 255 survive.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg_deploy import CLASS_NAMES
from cellseg_deploy.data.io import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, image_size, read_id_mask, read_image
from cellseg_deploy.errors import ConfigError, DataError

CLASS_FILE = re.compile(r"^class(\d+)\.tiff?$", re.IGNORECASE)
TEST_MAP_NAME = "test_image_name_to_ids.json"
TEST_GT_NAME = "test_ground_truth.json"

# The splits of a dataset every command offers, in this order (``--split``): all = every train/ image,
# train/val = the seeded split of train/ (:func:`split_train_val`), test = test_release/ with its ground truth.
SPLITS: tuple[str, ...] = ("all", "train", "val", "test")
# The share of train/ held out as val unless a recipe or ``--val-fraction`` says otherwise.
DEFAULT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Sample:
    """One training image with its instances.

    Attributes:
        sample_id: the folder name under ``train/``.
        image: RGB uint8 ``[H, W, 3]``.
        masks: bool ``[N, H, W]``, one mask per instance.
        labels: int64 ``[N]`` in 1..4 (``classK.tif`` -> ``K``).
        boxes: float32 ``[N, 4]`` ``x1, y1, x2, y2`` with exclusive ``x2 = max_x + 1``, ``y2 = max_y + 1``.
        instance_ids: int64 ``[N]``, the ID values in the class files.

    Instances are ordered by class, then by ID.
    """

    sample_id: str
    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    instance_ids: np.ndarray

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass(frozen=True)
class TestEntry:
    """One test image: its file, its id in the competition's map, and its size in pixels."""

    file_name: str
    image_id: int
    height: int
    width: int
    path: Path


def train_dir(root: str | Path) -> Path:
    """``root/train``; raises :class:`DataError` when the dataset root or the folder is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"dataset folder {root} does not exist; make one with 'cellseg-deploy data synth {root}'"
        )
    folder = root / "train"
    if not folder.is_dir():
        raise DataError(f"{root} has no train/ folder; expected train/<id>/image.tif + classK.tif")
    return folder


def list_train_ids(root: str | Path) -> list[str]:
    """Sorted folder names under ``root/train``."""
    return sorted(p.name for p in train_dir(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def class_files(folder: Path) -> list[tuple[int, Path]]:
    """``(class, path)`` of the ``classK.tif`` files in a sample folder, sorted by class (any K)."""
    out = []
    for p in folder.iterdir():
        m = CLASS_FILE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def instances_from_id_mask(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split an ID mask float64 ``[H, W]`` into ``(masks bool [N, H, W], boxes float32 [N, 4], ids int64 [N])``.

    Works on the bounding window of each ID, so cost grows with the instances, not with ``N * H * W`` reads.
    """
    height, width = ids.shape
    values = np.unique(ids)
    values = values[values != 0]
    masks = np.zeros((len(values), height, width), dtype=bool)
    boxes = np.zeros((len(values), 4), dtype=np.float32)
    if len(values) == 0:
        return masks, boxes, values.astype(np.int64)
    # Locate every pixel of every ID once: sort the flat foreground pixels by ID.
    flat = ids.ravel()
    fg = np.flatnonzero(flat)
    order = np.argsort(flat[fg], kind="stable")
    fg = fg[order]
    starts = np.searchsorted(flat[fg], values, side="left")
    ends = np.searchsorted(flat[fg], values, side="right")
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        pix = fg[s:e]
        ys, xs = pix // width, pix % width
        masks[i, ys, xs] = True
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return masks, boxes, values.astype(np.int64)


def load_sample(root: str | Path, sample_id: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Sample:
    """Read ``root/train/<sample_id>``: the image and every ``classK.tif`` (K in 1..4).

    ``max_pixels`` is the image's pixel limit (:func:`~cellseg_deploy.data.io.read_image`).

    Memory: ``masks`` is dense, ``N * H * W`` bytes (161 instances at 397 x 482: 31 MB; 700 at 2500 x 1900
    would be 3.3 GB), so callers that hold many samples should keep boxes and crops instead.

    Raises:
        DataError: missing image, unreadable files, an image above ``max_pixels``, a mask whose shape differs
            from the image, a multi-page mask, bad IDs, or a class file outside 1..4.
    """
    folder = train_dir(root) / sample_id
    if not folder.is_dir():
        raise DataError(f"{folder}: sample folder not found")
    image_path = folder / "image.tif"
    if not image_path.is_file():
        raise DataError(f"{image_path}: missing image.tif")
    image = read_image(image_path, max_pixels=max_pixels)
    all_masks, all_boxes, all_labels, all_ids = [], [], [], []
    for k, path in class_files(folder):
        if not 1 <= k <= len(CLASS_NAMES):
            raise DataError(f"{path}: class {k} is outside 1..{len(CLASS_NAMES)}; rename or remove the file")
        ids = read_id_mask(path)
        if ids.shape != image.shape[:2]:
            raise DataError(
                f"{path}: mask shape {ids.shape[0]}x{ids.shape[1]} differs from image.tif {image.shape[0]}x{image.shape[1]}"
            )
        masks, boxes, values = instances_from_id_mask(ids)
        all_masks.append(masks)
        all_boxes.append(boxes)
        all_labels.append(np.full(len(values), k, np.int64))
        all_ids.append(values)
    h, w = image.shape[:2]
    return Sample(
        sample_id=sample_id,
        image=image,
        masks=np.concatenate(all_masks) if all_masks else np.zeros((0, h, w), bool),
        labels=np.concatenate(all_labels) if all_labels else np.zeros((0,), np.int64),
        boxes=np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32),
        instance_ids=np.concatenate(all_ids) if all_ids else np.zeros((0,), np.int64),
    )


def split_train_val(
    ids: list[str], val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic split of sample ids into ``(train, val)``, both sorted.

    Each id is ranked by the SHA-256 of ``"<seed>:<id>"``; the first ``round(n * val_fraction)`` (at least 1 when
    ``val_fraction > 0`` and ``n >= 2``) go to validation. The result depends only on the set of ids, the seed and
    the fraction — not on their order, not on Python's hash seed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    unique = sorted(set(ids))
    n_val = round(len(unique) * val_fraction)
    if val_fraction > 0 and len(unique) >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(len(unique) - 1, 0))
    ranked = sorted(unique, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    val = sorted(ranked[:n_val])
    train = sorted(ranked[n_val:])
    return train, val


def read_test_index(root: str | Path, check_sizes: bool = False) -> tuple[list[TestEntry], list[str]]:
    """The test images of ``test_image_name_to_ids.json`` + ``test_release/``, and every problem found.

    Returns:
        ``(entries, problems)``: the entries that point at an existing file (in map order) and one line per
        problem: a missing map or folder, invalid JSON, a malformed entry, a duplicate id or file name, a listed
        file that is missing, an image in the folder that the map does not list, and (with ``check_sizes``)
        an image whose height or width differs from the map (read from the TIFF header, no decoding).
    """
    root = Path(root)
    map_path, folder = root / TEST_MAP_NAME, root / "test_release"
    problems: list[str] = []
    if not map_path.is_file():
        problems.append(f"{map_path}: test id map not found (expected beside test_release/)")
    if not folder.is_dir():
        problems.append(f"{folder}: test image folder not found (expected beside {TEST_MAP_NAME})")
    if problems:
        return [], problems
    try:
        entries = json.loads(map_path.read_text())
    except (OSError, ValueError) as exc:
        return [], [f"{map_path}: not valid JSON ({_first(exc)})"]
    if not isinstance(entries, list):
        return [], [
            f"{map_path}: expected a JSON list of {{file_name, id, height, width}}, got {type(entries).__name__}"
        ]
    out: list[TestEntry] = []
    seen_ids: dict[int, str] = {}
    seen_names: set[str] = set()
    for i, e in enumerate(entries):
        if isinstance(e, dict) and "file_name" in e:
            if str(e["file_name"]) in seen_names:
                problems.append(f"{map_path}: file {e['file_name']} appears more than once")
                continue
            seen_names.add(str(e["file_name"]))  # listed, even if the entry is broken: no second complaint
        if not isinstance(e, dict) or not {"file_name", "id", "height", "width"} <= set(e):
            problems.append(f"{map_path}: entry {i} lacks one of file_name, id, height, width")
            continue
        name, image_id = str(e["file_name"]), e["id"]
        sizes = (e["height"], e["width"])
        if any(not isinstance(v, int) or isinstance(v, bool) for v in (image_id, *sizes)):
            problems.append(f"{map_path}: entry {i} ({name}) has a non-integer id, height or width")
            continue
        if image_id in seen_ids:
            problems.append(
                f"{map_path}: id {image_id} appears more than once ({seen_ids[image_id]} and {name})"
            )
            continue
        seen_ids[image_id] = name
        path = folder / name
        if not path.is_file():
            problems.append(f"{map_path}: lists {name}, which is not in {folder}")
            continue
        entry = TestEntry(name, int(image_id), int(e["height"]), int(e["width"]), path)
        if check_sizes:
            try:
                h, w = image_size(path)
            except DataError as exc:
                problems.append(str(exc))
                continue
            if (h, w) != (entry.height, entry.width):
                problems.append(
                    f"{map_path}: {name} is {h}x{w} (HxW) but the map says {entry.height}x{entry.width}"
                )
        out.append(entry)
    for p in list_images(folder):
        if p.name not in seen_names:
            problems.append(f"{folder / p.name}: image not listed in {TEST_MAP_NAME}")
    return out, problems


def load_test_index(root: str | Path, check_sizes: bool = False) -> list[TestEntry]:
    """The test images from ``test_image_name_to_ids.json`` and ``test_release/``, in map order.

    Args:
        root: the dataset root.
        check_sizes: also compare each image's height and width (TIFF header) with the map.

    Raises:
        DataError: a missing map or folder, a malformed entry, duplicate ids or names, a listed file that is
            missing, or an image in the folder that the map does not list: the first problem, and how many more.
    """
    entries, problems = read_test_index(root, check_sizes=check_sizes)
    if problems:
        more = (
            f" (and {len(problems) - 1} more problem(s); run 'cellseg-deploy data check')"
            if len(problems) > 1
            else ""
        )
        raise DataError(problems[0] + more)
    return entries


def list_images(folder: str | Path) -> list[Path]:
    """Image files (TIFF, PNG, JPEG) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _first(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]
