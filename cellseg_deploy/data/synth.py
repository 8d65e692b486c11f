"""Synthetic microscopy in exactly the competition's format, for demos and tests (no download).

Each image has a stained, textured background (low-frequency stain variation, grain) and cells of four classes
that differ learnably in size, shape, colour and texture:

=======  ===========================  ==============================  ============
class    shape                        colour                          radius (px)
=======  ===========================  ==============================  ============
class1   large, round, pale           light violet, smooth             8 - 12
class2   small, round, dense          dark blue-violet                 3.5 - 5.5
class3   elongated ellipse            magenta                          9 - 13 x 3 - 4.5
class4   medium, irregular, speckled  brown with dark speckles         5.5 - 8
=======  ===========================  ==============================  ============

Cells have irregular (low-harmonic) outlines and shading; some grow in clusters so they touch, later cells
occlude earlier ones (the ID mask holds the visible part), cells are cut at the image border, and instances whose
visible area falls below :attr:`SynthConfig.min_area` are dropped so ground truth has no specks. IDs are sparse and
non-contiguous per class file (random gaps), and dense images push them past 255.

Everything is drawn from ``numpy.random.default_rng`` streams derived from the seed, and the TIFF writer adds no
timestamps, so the same seed gives the same bytes.

:func:`fluorescence_cell_image` is a second, simpler look (bright ellipses on a dark background, no ground
truth): the ONNX export's fallback trace and check images, and test input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from cellseg_deploy.data.coco import categories, sample_annotations
from cellseg_deploy.data.io import write_id_mask_tif, write_image_tif
from cellseg_deploy.data.layout import TEST_GT_NAME, TEST_MAP_NAME, Sample, instances_from_id_mask
from cellseg_deploy.errors import ConfigError, DataError
from cellseg_deploy.io_utils import atomic_write_json, atomic_write_with


@dataclass(frozen=True)
class CellClass:
    """Appearance of one class: radius ranges (px) of the two ellipse axes, RGB colour, texture strength."""

    radius_major: tuple[float, float]
    radius_minor: tuple[float, float] | None  # None: round (minor = major * 0.8..1.0)
    color: tuple[int, int, int]
    speckle: float
    frequency: float


CELL_CLASSES: tuple[CellClass, ...] = (
    CellClass((8.0, 12.0), None, (176, 136, 214), 0.0, 0.20),
    CellClass((3.5, 5.5), None, (58, 36, 120), 0.0, 0.40),
    CellClass((9.0, 13.0), (3.0, 4.5), (208, 64, 140), 0.0, 0.20),
    CellClass((5.5, 8.0), None, (150, 100, 50), 0.45, 0.20),
)


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`make_synthetic_dataset` makes.

    Attributes:
        n_train / n_test: number of training / test images.
        min_size / max_size: image side range in pixels (height and width drawn independently).
        min_cells / max_cells: cells placed per image (before occlusion; capped by the image area).
        seed: the random seed; the same config gives byte-identical files.
        extremes: add the hard cases to the training side: a ~40 px image, a large (>1000 px) dense image and
            an image dense enough that one class's IDs exceed 255.
        cluster_fraction: share of cells placed next to an earlier cell (touching / overlapping).
        min_area: instances with fewer visible pixels are dropped.
    """

    n_train: int = 48
    n_test: int = 8
    min_size: int = 160
    max_size: int = 320
    min_cells: int = 15
    max_cells: int = 80
    seed: int = 0
    extremes: bool = False
    cluster_fraction: float = 0.35
    min_area: int = 12

    def __post_init__(self) -> None:
        if self.n_train < 0 or self.n_test < 0 or (self.n_train + self.n_test == 0 and not self.extremes):
            raise ConfigError(
                f"--train and --test must be >= 0 and not both 0, got {self.n_train}, {self.n_test}"
            )
        if not 16 <= self.min_size <= self.max_size:
            raise ConfigError(
                f"sizes must satisfy 16 <= --min-size <= --max-size, got {self.min_size}, {self.max_size}"
            )
        if not 0 <= self.min_cells <= self.max_cells:
            raise ConfigError(
                f"cells must satisfy 0 <= --min-cells <= --max-cells, got {self.min_cells}, {self.max_cells}"
            )
        if not 0.0 <= self.cluster_fraction <= 1.0 or self.min_area < 1:
            raise ConfigError(
                f"cluster_fraction must lie in [0, 1] and min_area be >= 1, got {self.cluster_fraction}, {self.min_area}"
            )


@dataclass
class SynthImage:
    """One generated image: RGB uint8 ``[H, W, 3]`` and one float64 ID mask ``[H, W]`` per present class."""

    image: np.ndarray
    id_masks: dict[int, np.ndarray]


@dataclass
class SynthSummary:
    """What :func:`make_synthetic_dataset` wrote.

    Attributes:
        root: the dataset folder.
        n_train / n_test: images written on each side (``n_train`` includes the extremes).
        instances: visible instances over all images (train and test).
        max_instances: most instances in one image.
        max_id: highest ID value in any class file.
        config: the :class:`SynthConfig` as a dict.
    """

    root: Path
    n_train: int
    n_test: int
    instances: int
    max_instances: int
    max_id: int
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json``."""
        d = asdict(self)
        d["root"] = str(self.root)
        return d


def _uuid(rng: np.random.Generator) -> str:
    b = rng.integers(0, 256, 16, dtype=np.uint8).tobytes().hex()
    return f"{b[:8]}-{b[8:12]}-{b[12:16]}-{b[16:20]}-{b[20:]}"


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Pale pink-violet stained background with low-frequency variation and grain, float32 ``[H, W, 3]``."""
    base = np.array([228, 212, 226], np.float32) + rng.normal(0, 5, 3).astype(np.float32)
    gh, gw = max(2, h // 48 + 2), max(2, w // 48 + 2)
    low = cv2.resize(rng.normal(0, 1, (gh, gw, 2)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    stain = low[:, :, :1] * np.array([12, 12, 10], np.float32) + low[:, :, 1:] * np.array(
        [5, -3, 4], np.float32
    )
    fibres = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2.0)[:, :, None]
    grain = rng.normal(0, 4.0, (h, w, 1)).astype(np.float32)
    return base + stain + fibres * np.array([40, 45, 35], np.float32) + grain


def _cell_shape(rng: np.random.Generator, kind: CellClass) -> tuple[float, float, float, np.ndarray]:
    """Semi-axes (a, b), angle (rad) and outline harmonics of one cell."""
    a = rng.uniform(*kind.radius_major)
    b = rng.uniform(*kind.radius_minor) if kind.radius_minor else a * rng.uniform(0.8, 1.0)
    harmonics = rng.normal(0, 0.05, (3, 2))  # amplitude of cos/sin k*theta, k = 2..4
    return a, b, rng.uniform(0, np.pi), harmonics


def render_image(
    rng: np.random.Generator, h: int, w: int, n_cells: int, cluster_fraction: float = 0.35, min_area: int = 12
) -> SynthImage:
    """Draw one image with about ``n_cells`` cells (see the module docstring)."""
    image = _background(rng, h, w)
    owner = np.full((h, w), -1, np.int32)
    freqs = np.array([c.frequency for c in CELL_CLASSES])
    labels = rng.choice(len(CELL_CLASSES), size=n_cells, p=freqs / freqs.sum())
    shapes: list[tuple[float, float, float, np.ndarray]] = []
    windows: list[tuple[int, int, int, int]] = []
    centres: list[tuple[float, float]] = []
    for i in range(n_cells):
        kind = CELL_CLASSES[labels[i]]
        a, b, angle, harm = _cell_shape(rng, kind)
        if centres and rng.random() < cluster_fraction:  # touch an earlier cell
            j = int(rng.integers(len(centres)))
            direction = rng.uniform(0, 2 * np.pi)
            dist = (shapes[j][0] + a) * rng.uniform(0.75, 1.0)
            cy, cx = centres[j][0] + dist * np.sin(direction), centres[j][1] + dist * np.cos(direction)
        else:
            cy, cx = rng.uniform(-0.3 * a, h + 0.3 * a), rng.uniform(-0.3 * a, w + 0.3 * a)
        r = int(np.ceil(a * (1.0 + np.abs(harm).sum()))) + 1  # the outline never leaves its window
        y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, h)
        x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, w)
        shapes.append((a, b, angle, harm))
        centres.append((cy, cx))
        windows.append((y0, y1, x0, x1))
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        ca, sa = np.cos(angle), np.sin(angle)
        u, v = dx * ca + dy * sa, -dx * sa + dy * ca
        theta = np.arctan2(v, u)
        wobble = 1.0 + sum(
            harm[k, 0] * np.cos((k + 2) * theta) + harm[k, 1] * np.sin((k + 2) * theta) for k in range(3)
        )
        inside = (u / a) ** 2 + (v / b) ** 2 <= wobble**2
        owner[y0:y1, x0:x1][inside] = i
    # Visible areas after occlusion; tiny remnants go back to background.
    areas = np.bincount(owner[owner >= 0], minlength=n_cells)
    keep = areas >= min_area
    if n_cells:  # an image may have no cells at all
        owner[(owner >= 0) & ~keep[np.maximum(owner, 0)]] = -1
    # Paint the visible part of every kept cell: colour, radial shading, texture.
    for i in np.flatnonzero(keep).tolist():
        kind = CELL_CLASSES[labels[i]]
        y0, y1, x0, x1 = windows[i]
        if y1 <= y0 or x1 <= x0:
            continue
        sel = owner[y0:y1, x0:x1] == i
        if not sel.any():
            continue
        a, b, angle, _ = shapes[i]
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        rr = np.sqrt((yy - centres[i][0]) ** 2 + (xx - centres[i][1]) ** 2) / max(a, 1.0)
        colour = np.array(kind.color, np.float32) + rng.normal(0, 8, 3).astype(np.float32)
        shade = (1.0 - 0.25 * np.clip(rr, 0, 1.2))[:, :, None]
        pixel = colour * (0.85 + 0.3 * shade)
        if kind.speckle > 0:
            speck = rng.random(sel.shape) < kind.speckle * 0.5
            pixel = pixel * np.where(speck, 0.55, 1.0)[:, :, None]
        pixel += rng.normal(0, 5.0, pixel.shape).astype(np.float32)
        region = image[y0:y1, x0:x1]
        region[sel] = pixel[sel]
        # a thin darker membrane so touching cells stay distinguishable, as in stained nuclei
        edge = sel & ~cv2.erode(sel.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        region[edge] *= 0.8
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    # Per-class ID masks with sparse, non-contiguous IDs (random gaps), in painting order.
    id_masks: dict[int, np.ndarray] = {}
    for k in range(len(CELL_CLASSES)):
        members = [i for i in np.flatnonzero(keep) if labels[i] == k]
        if not members:
            continue
        ids = np.cumsum(rng.integers(1, 4, len(members))) + int(rng.integers(0, 3))
        lut = np.zeros(n_cells + 1, np.float64)
        lut[np.array(members) + 1] = ids
        id_masks[k + 1] = lut[owner + 1]
    return SynthImage(rgb, id_masks)


def fluorescence_cell_image(
    height: int, width: int, *, seed: int = 0, n_cells: int = 40, invert: bool = False
) -> np.ndarray:
    """A fluorescence-like RGB uint8 ``[height, width, 3]`` image: bright elliptical cells (radius 4 to 14 px,
    some touching) on a dark, slightly noisy background; ``invert`` gives dark cells on a bright one.

    Not the data set's look (:func:`render_image` draws stained cells on a pale background, with ID masks):
    an image unlike the training data, with no ground truth, that needs no dataset. The ONNX export traces
    and self-checks with it when :func:`render_image`'s image gives no detection, and tests use it as input
    that any model sees cells in. The same arguments give the same pixels (drawn from ``default_rng(seed)``).
    """
    rng = np.random.default_rng(seed)
    canvas = np.full((height, width), 20.0, np.float32)
    for _ in range(n_cells):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        ax, ay = rng.uniform(4, 14, size=2)
        angle = rng.uniform(0, 180)
        level = float(rng.uniform(120, 240))
        cv2.ellipse(canvas, (round(cx), round(cy)), (round(ax), round(ay)), angle, 0, 360, level, -1)
    canvas = np.asarray(cv2.GaussianBlur(canvas, (0, 0), 1.0), np.float32) + rng.normal(
        0, 4, canvas.shape
    ).astype(np.float32)
    if invert:
        canvas = 255.0 - canvas
    gray = np.clip(canvas, 0, 255).astype(np.uint8)
    tint = np.array([0.8, 1.0, 0.9], np.float32)
    return np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)


def _plan(config: SynthConfig, rng: np.random.Generator, count: int) -> list[tuple[int, int, int]]:
    """``(height, width, cells)`` per image: sizes uniform in the range, cells capped at one per ~150 px^2."""
    plans = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(config.min_size, config.max_size + 1, 2))
        cells = int(rng.integers(config.min_cells, config.max_cells + 1))
        plans.append((h, w, min(cells, max(1, h * w // 150))))
    return plans


EXTREME_PLANS: tuple[tuple[int, int, int], ...] = ((40, 44, 4), (1100, 1300, 700), (420, 460, 900))
"""The hard cases added by ``extremes``: a tiny image, a large dense one, one whose IDs pass 255."""


def _sample_from(image: SynthImage, sample_id: str) -> Sample:
    masks, boxes, labels, ids = [], [], [], []
    h, w = image.image.shape[:2]
    for k, id_mask in sorted(image.id_masks.items()):
        m, b, v = instances_from_id_mask(id_mask)
        masks.append(m)
        boxes.append(b)
        labels.append(np.full(len(v), k, np.int64))
        ids.append(v)
    return Sample(
        sample_id=sample_id,
        image=image.image,
        masks=np.concatenate(masks) if masks else np.zeros((0, h, w), bool),
        labels=np.concatenate(labels) if labels else np.zeros((0,), np.int64),
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        instance_ids=np.concatenate(ids) if ids else np.zeros((0,), np.int64),
    )


def _stale_entries(out: Path, train_names: set[str], test_names: set[str]) -> list[Path]:
    """Entries of an earlier dataset in ``out`` that this run would not overwrite (they would mix in).

    Hidden names (a temporary file left by an interrupted run) are ignored: no reader looks at them.
    """
    stale: list[Path] = []
    if (out / "train").is_dir():
        stale += [
            p
            for p in sorted((out / "train").iterdir())
            if p.name not in train_names and not p.name.startswith(".")
        ]
    if (out / "test_release").is_dir():
        stale += [
            p
            for p in sorted((out / "test_release").iterdir())
            if p.name not in test_names and not p.name.startswith(".")
        ]
    if not test_names:
        stale += [p for p in (out / TEST_MAP_NAME, out / TEST_GT_NAME) if p.exists()]
    return stale


def make_synthetic_dataset(
    out: str | Path, config: SynthConfig | None = None, progress: bool = True
) -> SynthSummary:
    """Write a synthetic dataset in the competition layout into ``out`` (see :mod:`cellseg_deploy.data.layout`).

    Writes ``train/<uuid>/image.tif`` (RGBA uint8, LZW, alpha 255), ``train/<uuid>/classK.tif`` (float64,
    uncompressed, only the classes present), ``test_release/<uuid>.tif``, ``test_image_name_to_ids.json`` (ids
    1..n_test in generation order) and ``test_ground_truth.json`` (COCO, those ids, RLE at full size). Names
    are uuid-like strings drawn from the seed; image ``i`` of each side is drawn from its own stream
    ``(seed, side, i)``. Every file is written atomically (temporary name, then rename).

    Running again with the same config into the same folder rewrites the same files (idempotent).

    Args:
        out: the dataset folder (created if needed).
        config: what to make (default: :class:`SynthConfig` defaults).
        progress: a tqdm bar (rate, ETA) on a terminal.

    Raises:
        DataError: ``out`` already holds sample folders, test images or a test map that this config would not
            write (an earlier run with other settings); they would silently mix into the new set.
    """
    config = config or SynthConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder; choose a folder for the synthetic dataset")
    root_rng = np.random.default_rng(config.seed)
    train_plans = _plan(config, root_rng, config.n_train)
    if config.extremes:
        train_plans += list(EXTREME_PLANS)
    test_plans = _plan(config, root_rng, config.n_test)
    jobs = [("train", i, p) for i, p in enumerate(train_plans)] + [
        ("test", i, p) for i, p in enumerate(test_plans)
    ]
    name_rng = np.random.default_rng([config.seed, 7])
    names = [_uuid(name_rng) for _ in jobs]
    train_names = {n for (side, _, _), n in zip(jobs, names, strict=True) if side == "train"}
    test_names = {f"{n}.tif" for (side, _, _), n in zip(jobs, names, strict=True) if side == "test"}
    stale = _stale_entries(out, train_names, test_names)
    if stale:
        raise DataError(
            f"{out} already holds {len(stale)} file(s) or folder(s) from another dataset (e.g. {stale[0]}); "
            "write to a new folder or delete the old one first"
        )
    total = most = max_id = 0
    test_map: list[dict[str, Any]] = []
    test_images: list[dict[str, Any]] = []
    test_anns: list[dict[str, Any]] = []
    bar = tqdm(
        zip(jobs, names, strict=True),
        total=len(jobs),
        desc="synth",
        unit="img",
        disable=None if progress else True,
    )
    for (side, index, (h, w, cells)), name in bar:
        rng = np.random.default_rng([config.seed, 0 if side == "train" else 1, index])
        img = render_image(rng, h, w, cells, config.cluster_fraction, config.min_area)
        n = sum(len(np.unique(m)) - 1 for m in img.id_masks.values())
        total += n
        most = max(most, n)
        max_id = max([max_id, *(int(m.max()) for m in img.id_masks.values())])
        if side == "train":
            folder = out / "train" / name
            _write(folder / "image.tif", write_image_tif, img.image)
            for k, id_mask in sorted(img.id_masks.items()):
                _write(folder / f"class{k}.tif", write_id_mask_tif, id_mask)
        else:
            file_name = f"{name}.tif"
            _write(out / "test_release" / file_name, write_image_tif, img.image)
            image_id = index + 1
            test_map.append({"file_name": file_name, "id": image_id, "height": h, "width": w})
            test_images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            test_anns += sample_annotations(_sample_from(img, name), image_id, len(test_anns) + 1)
    out.mkdir(parents=True, exist_ok=True)
    if config.n_test:
        atomic_write_json(out / TEST_MAP_NAME, test_map)
        atomic_write_json(
            out / TEST_GT_NAME,
            {"images": test_images, "annotations": test_anns, "categories": categories()},
            indent=None,
        )
    return SynthSummary(out, len(train_plans), len(test_plans), total, most, max_id, asdict(config))


def _write(path: Path, writer: Callable[[Path, np.ndarray], None], array: np.ndarray) -> None:
    atomic_write_with(path, lambda tmp: writer(tmp, array))


def describe(summary: SynthSummary) -> str:
    """One paragraph for the CLI."""
    return (
        f"wrote {summary.n_train} training and {summary.n_test} test images to {summary.root} "
        f"({summary.instances} instances, at most {summary.max_instances} in one image, highest ID {summary.max_id})"
    )
