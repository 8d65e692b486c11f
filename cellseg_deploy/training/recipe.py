"""Training recipes: frozen dataclasses, YAML loading and ``--set key=value`` overrides.

A recipe is a YAML file with one mapping per section::

    name: tiny_cpu
    seed: 0
    model:    {arch: tiny, min_size: 256, ...}       # any ModelConfig field
    weights:  {pretrained: none}                     # or init / pretrained_backbone: PATH
    data:     {val_fraction: 0.2, ...}
    augment:  {hflip: 0.5, rot90: 0.5, ...}
    optim:    {name: sgd, lr: 0.02, ...}
    schedule: {name: cosine, warmup_steps: 50, ...}
    train:    {epochs: 20, batch_size: 2, precision: auto, ...}
    val:      {every_epochs: 2, max_dets: 100, ...}

Sections and keys left out take the defaults below. Every key can be overridden with ``section.key=value``
(the value is parsed as YAML: ``optim.lr=0.01``, ``augment.scale_range=[0.8,1.25]``, ``weights.init=null``).
An unknown key, a wrong type or a value outside its allowed set raises :class:`ConfigError` naming the key
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cellseg_deploy.data.layout import DEFAULT_VAL_FRACTION
from cellseg_deploy.errors import ConfigError
from cellseg_deploy.modeling.builder import PRETRAINED_CHOICES
from cellseg_deploy.modeling.coerce import coerce
from cellseg_deploy.modeling.config import ModelConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "step", "cosine", "plateau")
PRECISIONS = ("auto", "fp32", "amp", "bf16")


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class WeightsSettings:
    """Initial weights (see :func:`cellseg_deploy.modeling.build_model` for the precedence).

    Attributes:
        pretrained: ``none`` (random initialisation), ``coco`` (torchvision's whole-detector weights) or
            ``imagenet`` (torchvision's backbone weights); both download through torchvision.
        init: a local file with the whole model's weights (``.pt``/``.pth``), or None.
        pretrained_backbone: a local ImageNet state dict for the backbone trunk, or None.
    """

    pretrained: str = field(default="none", metadata=_choices(*PRETRAINED_CHOICES))
    init: str | None = None
    pretrained_backbone: str | None = None


@dataclass(frozen=True)
class DataSettings:
    """Which images train and which validate.

    Attributes:
        val_fraction: fraction of ``train/`` held out for validation (a seeded split, see
            :func:`cellseg_deploy.data.layout.split_train_val`).
        split_seed: seed of that split (kept apart from the training seed so the split stays put).
        max_train_images / max_val_images: keep at most this many (0: all), for quick runs.
        num_workers: DataLoader worker processes per training process (0: load in the training process);
            ``null`` (default): 0 on the CPU (the cores compute), on CUDA ``min(4, cores per process - 1)``
            (at least 1): decoding TIFFs and augmenting in the training process starves a GPU.
        cache: keep decoded samples in memory after the first epoch (small datasets).
    """

    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = 0
    max_train_images: int = 0
    max_val_images: int = 0
    num_workers: int | None = None
    cache: bool = True


@dataclass(frozen=True)
class AugmentSettings:
    """Training augmentations, applied consistently to the image, boxes and masks.

    Probabilities are in [0, 1]; colour strengths are the maximum relative change (0: off).

    Attributes:
        hflip / vflip: probability of a horizontal / vertical flip.
        rot90: probability of a rotation by a random multiple of 90 degrees (90, 180 or 270).
        brightness / contrast / saturation: multiplicative jitter strength ``s``; factor drawn from
            ``[1 - s, 1 + s]``.
        hue: maximum hue shift as a fraction of the colour circle (0.5 = half a turn).
        stain: standard deviation of a per-channel stain jitter in optical density space (H&E-like
            colour variation: each channel's absorbance is scaled by ``1 + N(0, stain)`` and shifted by
            ``N(0, stain / 4)``).
        grayscale: probability of turning the image grey (three equal channels).
        scale_range: ``[low, high]`` range of a random rescale factor (``[1, 1]``: off). The image, boxes and
            masks are resized together; the model's own resize to ``min_size`` follows, so the scale change
            survives only together with ``crop_size``.
        crop_size: after scaling, a random window of at most ``crop_size x crop_size`` pixels (0: whole image).
        min_box_size: instances whose box is thinner than this (pixels, after cropping) are dropped.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    stain: float = 0.0
    grayscale: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    crop_size: int = 0
    min_box_size: float = 1.0


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer.

    Attributes:
        name: ``sgd`` (momentum, optional Nesterov) or ``adamw``.
        lr: the peak learning rate (after warm-up), for the whole batch (all processes together).
        momentum / nesterov: SGD only.
        betas / eps: AdamW only.
        weight_decay: decoupled for AdamW, L2 for SGD; not applied to BatchNorm weights and biases when
            ``norm_weight_decay`` is false.
        norm_weight_decay: apply weight decay to normalisation layers and biases too.
        grad_clip: clip the gradients' global L2 norm to this value (0: off).
    """

    name: str = field(default="sgd", metadata=_choices(*OPTIMIZERS))
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    norm_weight_decay: bool = False
    grad_clip: float = 0.0


@dataclass(frozen=True)
class ScheduleSettings:
    """Learning-rate schedule: a linear warm-up, then one of the shapes below.

    Attributes:
        name: ``constant``; ``step`` (multiply by ``gamma`` at each epoch in ``milestones``); ``cosine``
            (from 1 down to ``min_factor`` over all steps after warm-up); ``plateau`` (multiply by ``gamma``
            after ``patience`` validations without a segm AP50 better by more than ``val.min_delta``).
        warmup_steps: optimizer steps of linear warm-up from ``warmup_factor * lr`` to ``lr``.
        warmup_factor: the learning rate factor at step 0.
        milestones: for ``step``: the rate is multiplied by ``gamma`` once each of these many epochs have
            completed (``[8, 11]`` lowers it at the start of the 9th and the 12th epoch).
        gamma: the factor for ``step`` and ``plateau``.
        min_factor: floor of ``cosine``, relative to ``lr``.
        patience: validations without improvement before ``plateau`` lowers the rate.
        time_aware: ``cosine`` with ``train.time_limit_min``: the cosine follows whichever is further along, the
            steps or the clock (``elapsed / time limit`` of all steps), so a machine slower than planned still
            anneals before the limit stops it. Where the clock leads, the run depends on the machine's speed
            (not bitwise reproducible); on a machine fast enough for the planned steps it changes nothing.
    """

    name: str = field(default="cosine", metadata=_choices(*SCHEDULES))
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_factor: float = 0.0
    patience: int = 2
    time_aware: bool = False


@dataclass(frozen=True)
class TrainSettings:
    """The loop.

    Attributes:
        epochs: passes over the training images.
        batch_size: images per optimizer step and process (the global batch is ``batch_size * world_size``).
        precision: ``amp`` (fp16 autocast + GradScaler, CUDA only), ``bf16`` (bf16 autocast, CPU or CUDA),
            ``fp32``, or ``auto`` (``amp`` on CUDA, ``fp32`` on the CPU).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU intra-op threads per process (0: ``$OMP_NUM_THREADS`` when set, else all cores divided
            among the processes on this machine).
        max_steps: stop after this many optimizer steps (0: no limit); the last step is validated and saved.
        time_limit_min: stop after this many minutes of training (0: no limit); breaks the determinism of
            where training stops, nothing else.
        checkpoint_every_steps: also write ``last.pt`` every N optimizer steps (0: only at epoch ends), so a
            killed run resumes from mid-epoch.
        log_every_steps: write a training record to ``metrics.jsonl`` every N steps.
        deterministic: ask torch for deterministic algorithms (warn-only where none exists, e.g. some CUDA ops).
            Off by default: on CUDA it picks slow cuDNN kernels, turns off cuDNN's autotuner and fills every new
            tensor with NaN; CPU runs are reproducible without it (the CPU recipes still ask, at no cost).
            When off, torch's defaults apply (cuDNN's heuristics choose kernels; no autotuning, since the
            input sizes vary from batch to batch).
        tf32: on CUDA, let fp32 matmuls and convolutions (``precision: fp32``, and validation) run in TF32.
            Off by default: fp32 means fp32, as in the ``torch`` runner that evaluates the checkpoint.
        dist_timeout_min: timeout of the DDP process group's collectives (``init_process_group``), minutes.
        sync_batchnorm: under DDP on CUDA, train BatchNorm layers as ``SyncBatchNorm`` (statistics over the
            global batch); frozen BatchNorm is unaffected.
    """

    epochs: int = 12
    batch_size: int = 2
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    device: str = "auto"
    threads: int = 0
    max_steps: int = 0
    time_limit_min: float = 0.0
    checkpoint_every_steps: int = 0
    log_every_steps: int = 10
    deterministic: bool = False
    tf32: bool = False
    dist_timeout_min: float = 30.0
    sync_batchnorm: bool = True


@dataclass(frozen=True)
class ValSettings:
    """Validation during training (COCO segm AP50 first, then AP and AP75; bbox too).

    Attributes:
        every_epochs: validate every N epochs (and always after the last one).
        max_dets: COCOeval's cap: detections scored per image and category (as ``eval --max-dets``).
        score_thresh / mask_thresh: post-processing thresholds (the same as ``eval`` uses).
        early_stop_patience: stop after N validations without a better segm AP50 (0: never).
        min_delta: the smallest AP50 gain that counts as better.
        timeout_min: under DDP, how long the other processes wait for rank 0 to validate (minutes; a gloo
            barrier, not an NCCL collective with its shorter timeout).
    """

    every_epochs: int = 1
    max_dets: int = 100
    score_thresh: float = 0.0
    mask_thresh: float = 0.5
    early_stop_patience: int = 0
    min_delta: float = 0.0
    timeout_min: float = 180.0


SECTIONS: dict[str, type] = {
    "weights": WeightsSettings,
    "data": DataSettings,
    "augment": AugmentSettings,
    "optim": OptimSettings,
    "schedule": ScheduleSettings,
    "train": TrainSettings,
    "val": ValSettings,
}
TOP_LEVEL = ("name", "description", "source", "seed")


@dataclass(frozen=True)
class Recipe:
    """A complete training recipe (see the module docstring).

    Attributes:
        name: a short name (the YAML file's stem by default).
        description / source: what the recipe is for and where its numbers come from.
        seed: the training seed (data order, augmentation, RoI sampling, initial weights).
    """

    name: str = "recipe"
    description: str = ""
    source: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    weights: WeightsSettings = field(default_factory=WeightsSettings)
    data: DataSettings = field(default_factory=DataSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    val: ValSettings = field(default_factory=ValSettings)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples): JSON/YAML-able and ``weights_only``-loadable."""
        out: dict[str, Any] = {k: getattr(self, k) for k in TOP_LEVEL}
        out["model"] = self.model.to_dict()
        for name in SECTIONS:
            out[name] = _plain(dataclasses.asdict(getattr(self, name)))
        return out

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (every key, defaults included)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build and validate a recipe from nested mappings; raises :class:`ConfigError` naming bad keys."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"recipe: expected a mapping of sections, got {type(data).__name__}")
        allowed = [*TOP_LEVEL, "model", *SECTIONS]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"recipe: unknown key(s) {unknown}; allowed top-level keys are {allowed}")
        kwargs: dict[str, Any] = {}
        for key in TOP_LEVEL:
            if key in data:
                kwargs[key] = coerce(key, data[key], _field_type(Recipe, key), ())
        model = data.get("model") or {}
        if not isinstance(model, Mapping):
            raise ConfigError(f"model: expected a mapping of model settings, got {model!r}")
        kwargs["model"] = ModelConfig.from_dict(dict(model))
        for name, section_cls in SECTIONS.items():
            section = data.get(name) or {}
            kwargs[name] = _section_from_dict(name, section_cls, section)
        return cls(**kwargs)

    def with_overrides(self, overrides: Iterable[str]) -> Recipe:
        """A copy with ``section.key=value`` overrides applied (values parsed as YAML)."""
        data = self.to_dict()
        for item in overrides:
            key, value = parse_override(item)
            _set_path(data, key, value)
        return Recipe.from_dict(data)

    def replace(self, **sections: Any) -> Recipe:
        """A copy with whole fields or sections replaced (validated)."""
        return dataclasses.replace(self, **sections)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _section_from_dict(section: str, cls: type, data: Any) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; allowed keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(
            f"{section}.{name}", value, hints[name], fields[name].metadata.get("choices", ())
        )
    return cls(**kwargs)


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}, got {value!r}")


def _validate(r: Recipe) -> None:
    """Range checks across the recipe; each error names its key."""
    a, o, s, t, v, d = r.augment, r.optim, r.schedule, r.train, r.val, r.data
    for name in ("hflip", "vflip", "rot90", "grayscale"):
        _check(
            0.0 <= getattr(a, name) <= 1.0,
            f"augment.{name}",
            "must be a probability in [0, 1]",
            getattr(a, name),
        )
    for name in ("brightness", "contrast", "saturation", "stain"):
        _check(0.0 <= getattr(a, name) < 1.0, f"augment.{name}", "must lie in [0, 1)", getattr(a, name))
    _check(0.0 <= a.hue <= 0.5, "augment.hue", "must lie in [0, 0.5]", a.hue)
    lo, hi = a.scale_range
    _check(
        0.0 < lo <= hi, "augment.scale_range", "must be [low, high] with 0 < low <= high", list(a.scale_range)
    )
    _check(a.crop_size >= 0, "augment.crop_size", "must be >= 0 (0: whole image)", a.crop_size)
    _check(a.min_box_size >= 0.0, "augment.min_box_size", "must be >= 0", a.min_box_size)
    _check(o.lr > 0, "optim.lr", "must be > 0", o.lr)
    _check(0.0 <= o.momentum < 1.0, "optim.momentum", "must lie in [0, 1)", o.momentum)
    _check(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", "must lie in [0, 1)", list(o.betas))
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: off)", o.grad_clip)
    _check(o.eps > 0, "optim.eps", "must be > 0", o.eps)
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0", s.warmup_steps)
    _check(0.0 < s.warmup_factor <= 1.0, "schedule.warmup_factor", "must lie in (0, 1]", s.warmup_factor)
    _check(0.0 < s.gamma <= 1.0, "schedule.gamma", "must lie in (0, 1]", s.gamma)
    _check(0.0 <= s.min_factor <= 1.0, "schedule.min_factor", "must lie in [0, 1]", s.min_factor)
    _check(s.patience >= 1, "schedule.patience", "must be >= 1", s.patience)
    _check(
        all(m >= 1 for m in s.milestones), "schedule.milestones", "must be epochs >= 1", list(s.milestones)
    )
    _check(
        s.name != "step" or len(s.milestones) > 0,
        "schedule.milestones",
        "needs at least one epoch for 'step'",
        [],
    )
    _check(
        not s.time_aware or (s.name == "cosine" and t.time_limit_min > 0),
        "schedule.time_aware",
        "needs schedule.name 'cosine' and train.time_limit_min > 0",
        s.time_aware,
    )
    _check(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
    _check(t.threads >= 0, "train.threads", "must be >= 0 (0: all cores)", t.threads)
    _check(t.max_steps >= 0, "train.max_steps", "must be >= 0 (0: no limit)", t.max_steps)
    _check(t.time_limit_min >= 0, "train.time_limit_min", "must be >= 0 (0: no limit)", t.time_limit_min)
    _check(
        t.checkpoint_every_steps >= 0,
        "train.checkpoint_every_steps",
        "must be >= 0",
        t.checkpoint_every_steps,
    )
    _check(t.log_every_steps >= 1, "train.log_every_steps", "must be >= 1", t.log_every_steps)
    _check(
        t.device in ("auto", "cpu", "cuda") or (t.device.startswith("cuda:") and t.device[5:].isdigit()),
        "train.device",
        "expected one of ['auto', 'cpu', 'cuda', 'cuda:N']",
        t.device,
    )
    _check(v.every_epochs >= 1, "val.every_epochs", "must be >= 1", v.every_epochs)
    _check(v.max_dets >= 1, "val.max_dets", "must be >= 1", v.max_dets)
    _check(0.0 <= v.score_thresh <= 1.0, "val.score_thresh", "must lie in [0, 1]", v.score_thresh)
    _check(0.0 <= v.mask_thresh < 1.0, "val.mask_thresh", "must lie in [0, 1)", v.mask_thresh)
    _check(
        v.early_stop_patience >= 0,
        "val.early_stop_patience",
        "must be >= 0 (0: never)",
        v.early_stop_patience,
    )
    _check(v.min_delta >= 0.0, "val.min_delta", "must be >= 0", v.min_delta)
    _check(0.0 < d.val_fraction < 1.0, "data.val_fraction", "must lie in (0, 1)", d.val_fraction)
    for name in ("max_train_images", "max_val_images"):
        _check(getattr(d, name) >= 0, f"data.{name}", "must be >= 0", getattr(d, name))
    _check(
        d.num_workers is None or d.num_workers >= 0,
        "data.num_workers",
        "must be >= 0 or null (auto)",
        d.num_workers,
    )
    _check(t.dist_timeout_min > 0, "train.dist_timeout_min", "must be > 0", t.dist_timeout_min)
    _check(v.timeout_min > 0, "val.timeout_min", "must be > 0", v.timeout_min)


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)``; the value is parsed as YAML (``null``, lists, numbers)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})"
        ) from exc
    return key, value


def allowed_keys() -> list[str]:
    """Every overridable key, ``section.key`` form."""
    keys = list(TOP_LEVEL)
    keys += [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)]
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1:
        if key not in TOP_LEVEL:
            raise ConfigError(
                f"override {key!r}: unknown key; top-level keys are {list(TOP_LEVEL)}, others are "
                f"section.key with sections {['model', *SECTIONS]}"
            )
        data[key] = value
        return
    if len(parts) != 2:
        raise ConfigError(f"override {key!r}: expected section.key (one dot), e.g. optim.lr")
    section, name = parts
    if section not in data or section in TOP_LEVEL:
        raise ConfigError(
            f"override {key!r}: unknown section {section!r}; expected one of {['model', *SECTIONS]}"
        )
    allowed = [k.split(".", 1)[1] for k in allowed_keys() if k.startswith(section + ".")]
    if name not in allowed:
        raise ConfigError(
            f"override {key!r}: unknown key {name!r} in {section}; allowed keys are {sorted(allowed)}"
        )
    data[section][name] = value


def recipes_dir() -> Path:
    """Where named recipes live: ``cellseg_deploy/recipes/`` inside the installed package (shipped in the
    wheel as package data, so ``--recipe tiny_cpu`` works after a plain ``pip install``; a checkout's
    ``train/*.yaml`` are links to the same files)."""
    from importlib.resources import files

    # Wheels install unpacked, so the resource folder is a real directory.
    return Path(str(files("cellseg_deploy") / "recipes"))


def list_recipes() -> list[str]:
    """Names of the recipes in :func:`recipes_dir`."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_recipe_path(path_or_name: str | Path) -> Path:
    """A recipe file: an existing path, or a bare name looked up as ``<recipes_dir()>/<name>.yaml``."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    text = str(path_or_name)
    if "/" not in text and "\\" not in text:
        named = recipes_dir() / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
        if named.is_file():
            return named
    raise ConfigError(
        f"recipe {text!r} not found; pass a YAML file or one of the named recipes {list_recipes()}"
    )


def load_recipe(path_or_name: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe (path, or a bare name from :func:`recipes_dir`) and apply ``section.key=value`` overrides.

    The recipe's ``name`` defaults to the file's stem.

    Raises:
        ConfigError: missing file, invalid YAML, unknown key, wrong type or value out of range (naming it).
    """
    path = resolve_recipe_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    for item in overrides:
        key, value = parse_override(item)
        _set_path_raw(data, key, value)
    return Recipe.from_dict(data)


def _set_path_raw(data: dict[str, Any], key: str, value: Any) -> None:
    """Like :func:`_set_path` on a partial dict as read from YAML (sections may be absent)."""
    skeleton: dict[str, Any] = {k: None for k in TOP_LEVEL} | {s: {} for s in ("model", *SECTIONS)}
    _set_path(skeleton, key, value)  # validates the key's name
    parts = key.split(".")
    if len(parts) == 1:
        data[key] = value
        return
    section = data.get(parts[0])
    if section is None:
        data[parts[0]] = section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]}: expected a mapping of settings, got {section!r}")
    section[parts[1]] = value
