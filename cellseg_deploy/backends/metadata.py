"""Provenance metadata carried inside every exported model file.

An exported graph must say what it was made from without a side file: the architecture and the full model
config, the class names, the SHA-256 of the source checkpoint, the library versions, the opset, the exporter
and the export time. ONNX stores this as ``metadata_props`` (a list of string key/value pairs, shown by Netron
and returned by ONNX Runtime's ``session.get_modelmeta().custom_metadata_map``); TensorRT manifests can store
the same dict as JSON.

Keys (all values are strings in the file; ``json_keys`` lists the entries that hold JSON):

- ``format``: :data:`METADATA_FORMAT`, the layout of this metadata.
- ``arch``, ``class_names`` (JSON list, label ``k`` is ``class_names[k - 1]``), ``model_config`` (JSON, every
  :class:`~cellseg_deploy.modeling.config.ModelConfig` field), ``mask_size`` (``M`` of the ``M x M`` mask
  probabilities).
- ``source_checkpoint`` (file name), ``source_sha256`` (hex SHA-256 of the checkpoint's bytes),
  ``source_epoch``, ``source_metrics`` (JSON, the checkpoint's last validation metrics).
- ``versions`` (JSON: python, torch, torchvision, numpy, onnx, onnxruntime, cellseg_deploy),
  ``exporter`` (e.g. ``torch.onnx.export(dynamo=False)``), ``opset``, ``exported_at`` (ISO 8601 UTC; taken
  from ``SOURCE_DATE_EPOCH`` when that is set, for reproducible files).
- ``inputs`` / ``outputs`` (JSON): the I/O contract in words (names, dtypes, shapes, units).
- ``graph_sha256``: SHA-256 of the serialised model *without* its metadata, so two exports of the same
  checkpoint can be compared even though their export times differ.

Every helper here is format-agnostic except the ``*_onnx_*`` ones, so the staged and TensorRT exporters reuse
:func:`provenance` for their manifests.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

    from cellseg_deploy.modeling.checkpoint import Checkpoint

METADATA_FORMAT = "cellseg-deploy/onnx-metadata/1"
"""Version of the metadata layout written by :func:`provenance`."""

JSON_KEYS: frozenset[str] = frozenset(
    {"class_names", "model_config", "source_metrics", "versions", "inputs", "outputs", "checks"}
)
"""Keys always stored as JSON, even when their value is a string."""

JSON_KEYS_KEY = "json_keys"
"""The metadata entry listing which other entries hold JSON."""


def export_time() -> str:
    """The export time as ISO 8601 UTC (seconds). ``SOURCE_DATE_EPOCH`` (Unix seconds), when set, wins,
    so a build system can make byte-identical files."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.strip().isdigit():
        when = _dt.datetime.fromtimestamp(int(epoch.strip()), tz=_dt.timezone.utc)
    else:
        when = _dt.datetime.now(_dt.timezone.utc)
    return when.isoformat(timespec="seconds")


def provenance(
    checkpoint: Checkpoint,
    checkpoint_sha256: str,
    *,
    exporter: str,
    opset: int | None = None,
    mask_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance dict of a model exported from ``checkpoint`` (JSON-able; see the module docstring).

    Args:
        checkpoint: the loaded source checkpoint (its ``path`` names the file).
        checkpoint_sha256: hex SHA-256 of the checkpoint file's bytes.
        exporter: how the artifact was made, e.g. ``"torch.onnx.export(dynamo=False)"``.
        opset: ONNX opset, when the artifact is ONNX.
        mask_size: ``M`` of the ``M x M`` mask probabilities the artifact outputs.
        extra: more keys (override the defaults of the same name).
    """
    from cellseg_deploy.modeling.checkpoint import library_versions

    config = checkpoint.model_config
    meta: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "arch": config.arch,
        "class_names": list(config.class_names),
        "model_config": config.to_dict(),
        "source_checkpoint": checkpoint.path.name if checkpoint.path is not None else "",
        "source_sha256": checkpoint_sha256,
        "source_epoch": int(checkpoint.epoch),
        "source_metrics": dict(checkpoint.metrics),
        "versions": library_versions(),
        "exporter": exporter,
        "exported_at": export_time(),
    }
    if opset is not None:
        meta["opset"] = int(opset)
    if mask_size is not None:
        meta["mask_size"] = int(mask_size)
    meta.update(extra or {})
    return meta


def encode_props(meta: dict[str, Any]) -> dict[str, str]:
    """Provenance dict -> string key/value pairs: strings stay as they are, everything else becomes JSON,
    and the key :data:`JSON_KEYS_KEY` lists the keys that hold JSON (so :func:`decode_props` restores the
    types exactly)."""
    out: dict[str, str] = {}
    json_keys: list[str] = []
    for key, value in meta.items():
        if key == JSON_KEYS_KEY:
            continue
        if isinstance(value, str) and key not in JSON_KEYS:
            out[key] = value
        else:
            out[key] = json.dumps(value)
            json_keys.append(key)
    out[JSON_KEYS_KEY] = json.dumps(json_keys)
    return out


def decode_props(props: dict[str, str]) -> dict[str, Any]:
    """String key/value pairs -> provenance dict (inverse of :func:`encode_props`). Files without the
    :data:`JSON_KEYS_KEY` entry decode :data:`JSON_KEYS` only. Values that are not valid JSON stay strings
    (never raises)."""
    try:
        json_keys = set(json.loads(props[JSON_KEYS_KEY])) if JSON_KEYS_KEY in props else set(JSON_KEYS)
    except (TypeError, ValueError):
        json_keys = set(JSON_KEYS)
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key == JSON_KEYS_KEY:
            continue
        if key in json_keys:
            try:
                out[key] = json.loads(value)
                continue
            except (TypeError, ValueError):
                pass
        out[key] = value
    return out


def set_onnx_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Replace ``model.metadata_props`` with ``meta`` (encoded by :func:`encode_props`), keys in order."""
    del model.metadata_props[:]
    for key, value in encode_props(meta).items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value


def get_onnx_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """The decoded provenance dict stored in ``model.metadata_props``."""
    return decode_props({p.key: p.value for p in model.metadata_props})


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded provenance of an ONNX file, read without loading the weights into a session.

    Raises:
        ModelFileError: the file is missing or is not a readable ONNX model.
    """
    import onnx

    from cellseg_deploy.errors import ModelFileError

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelFileError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from exc
    return get_onnx_metadata(model)


def graph_sha256(model: onnx.ModelProto) -> str:
    """Hex SHA-256 of ``model`` serialised without its ``metadata_props`` (graph, weights, opsets).

    Two exports of the same checkpoint by the same library versions give the same value when the exporter
    is deterministic, whatever their export times.
    """
    import onnx

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.metadata_props[:]
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()


def read_manifest(path: Path, name: str, fmt: str, missing: str, kind: str) -> tuple[Path, dict[str, Any]]:
    """Read a JSON manifest given as a file or as the folder holding ``name``; check its ``format``.

    Args:
        path: the manifest file or its folder.
        name: the manifest's file name inside a folder (``manifest.json``, ``engines.json``).
        fmt: the expected ``"format"`` value.
        missing: the one-line message when there is no manifest.
        kind: what the manifest is, with its article, for the wrong-format message ("a stage manifest").

    Returns:
        ``(manifest_path, manifest)``.

    Raises:
        ModelFileError: no manifest, unreadable JSON, or another format.
    """
    from cellseg_deploy.errors import ModelFileError

    path = Path(path)
    manifest_path = path / name if path.is_dir() else path
    if not manifest_path.is_file():
        raise ModelFileError(missing)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelFileError(f"{manifest_path} is not {kind} (format {found!r}, expected {fmt!r})")
    return manifest_path, manifest
