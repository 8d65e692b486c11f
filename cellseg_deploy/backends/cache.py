"""One export cache: a model file exported from a checkpoint once, reused while nothing it depends on changed.

:func:`cached_export` writes ``<cache_dir>/<checkpoint sha256[:16]>[-<options hash>]/<Format.cache_name>``
and beside it a record (``<cache_name>.export.json``) of what it was made from: the format, the source
checkpoint's SHA-256, the export options and the SHA-256 of the written file (for a folder: of its marker
manifest). A later call reuses the export only when all four match; anything else (no record, another
checkpoint, other options, a file edited or replaced since) exports again. The export goes to a private
temporary folder first and is moved into place only once complete, so a killed export never leaves a
half-written model that a later run would reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg_deploy.backends.registry import Format, get_format
from cellseg_deploy.errors import ModelFileError
from cellseg_deploy.io_utils import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".export.json"


@dataclass(frozen=True)
class CachedExport:
    """Where :func:`cached_export` left the model, and whether it was reused.

    Attributes:
        path: the exported file or folder.
        reused: ``True`` when an earlier export was reused, ``False`` when it was exported now.
    """

    path: Path
    reused: bool


def cached_export(
    fmt: str | Format,
    checkpoint: Path,
    cache_dir: Path,
    *,
    options: Mapping[str, Any] | None = None,
    checkpoint_sha: str | None = None,
    exporter: Callable[..., Any] | None = None,
) -> CachedExport:
    """Export ``checkpoint`` as ``fmt`` into ``cache_dir``, or reuse an earlier export of the same thing.

    Args:
        fmt: a registry format (name or entry) with a :attr:`~Format.cache_name`.
        checkpoint: the source checkpoint (``.pt``).
        cache_dir: the cache's root folder (created when missing).
        options: keyword arguments of the exporter (JSON-serialisable); part of the cache key.
        checkpoint_sha: the checkpoint's SHA-256 when already known (saves reading it again).
        exporter: the function to call instead of the entry's :attr:`~Format.exporter` (tests).

    Raises:
        ModelFileError: the format cannot be cached, its exporter cannot be imported, or it wrote nothing.
    """
    entry = fmt if isinstance(fmt, Format) else get_format(fmt)
    if entry.cache_name is None:
        raise ModelFileError(f"--format {entry.name} cannot be exported into a cache; pass the model file")
    opts = dict(options or {})
    sha = checkpoint_sha or sha256_file(checkpoint)
    folder = cache_dir / (sha[:16] + (f"-{_options_key(opts)}" if opts else ""))
    path = folder / entry.cache_name
    record_path = folder / (entry.cache_name + RECORD_SUFFIX)
    wanted = {"format": entry.name, "checkpoint_sha256": sha, "options": opts}
    if _record_matches(record_path, wanted, _done_file(entry, path)):
        return CachedExport(path, reused=True)
    func = exporter if exporter is not None else entry.load_exporter()
    folder.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s from %s into %s", entry.cache_name, checkpoint, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.cache_name}.partial-", dir=folder))
    try:
        func(checkpoint, tmp / entry.cache_name, **opts)
        done = _done_file(entry, tmp / entry.cache_name)
        if not done.is_file():
            raise ModelFileError(f"exporting {checkpoint} as --format {entry.name} wrote no {done.name}")
        record_path.unlink(missing_ok=True)  # from here until the new record, nothing counts as cached
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == entry.cache_name):  # the model last
            dest = folder / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
        atomic_write_json(record_path, {**wanted, "sha256": sha256_file(_done_file(entry, path))})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CachedExport(path, reused=False)


def _done_file(entry: Format, path: Path) -> Path:
    """The file whose presence and hash stand for the export: the file itself, or a folder's marker."""
    return path / entry.marker if entry.kind == "folder" and entry.marker else path


def _options_key(options: Mapping[str, Any]) -> str:
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _record_matches(record_path: Path, wanted: Mapping[str, Any], done: Path) -> bool:
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or not done.is_file():
        return False
    same = all(record.get(k) == json.loads(json.dumps(v, default=str)) for k, v in wanted.items())
    return same and record.get("sha256") == sha256_file(done)
