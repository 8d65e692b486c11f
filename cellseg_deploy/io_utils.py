"""Atomic file writes, output checks and hashing: every artifact is written to a temporary file, then renamed.

- :func:`atomic_path` (and the ``atomic_write_*`` helpers over it): write beside the destination, rename on
  success. A temporary file left by a killed write (``.NAME.*.tmp``) is removed by the next write to the same
  destination; one that a live writer still holds (an advisory lock on it) is left alone.
- :func:`check_output`: before any work, can this path be written (its folder exists or can be made, is
  writable, is not under a file)? Does it already exist? One-line :class:`OutputError` if not.
- :func:`rescue_path`: where finished results go when their destination fails at the very end.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cellseg_deploy.errors import UserError

try:  # advisory locks tell a live writer's temporary file from a killed one's (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

STALE_TMP_SECONDS = 3600.0
"""Without advisory locks (Windows), a leftover temporary file counts as stale after this many seconds."""


class OutputError(UserError):
    """An output path cannot be written (read-only folder, a file in the way, ...) or already exists."""


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}."


def remove_stale_temps(dest: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that killed writes of ``dest`` left beside it (``.NAME.*.tmp``).

    A file that a live writer holds (it keeps an exclusive ``flock`` on its temporary file until the
    rename) is skipped, so two processes writing the same place never delete each other's work. Returns the
    removed paths; errors (a file that vanished, a folder that cannot be listed) are ignored.
    """
    dest = Path(dest)
    removed: list[Path] = []
    try:
        candidates = [p for p in dest.parent.iterdir() if p.name.startswith(_tmp_prefix(dest))]
    except OSError:
        return removed
    for path in candidates:
        if not path.name.endswith(".tmp") or not path.is_file() or path.is_symlink():
            continue
        try:
            if _held_by_live_writer(path):
                continue
            path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


def _held_by_live_writer(path: Path) -> bool:
    if fcntl is None:  # pragma: no cover - Windows: age decides
        import time

        return time.time() - path.stat().st_mtime < STALE_TMP_SECONDS
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``, on error delete it.

    A crash or an exception while writing never leaves a partial ``dest`` behind, and an existing
    ``dest`` stays untouched until the new file is complete. Leftovers of earlier killed writes of ``dest``
    are removed first (:func:`remove_stale_temps`). When the finished file cannot be moved onto ``dest``
    (the folder became read-only, a folder now sits at ``dest``), it is kept and :class:`OutputError` says
    where, in one line.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(dest), suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks: the write still works
                fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename: marks this file as in use
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            yield tmp
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            kept = _keep_finished(tmp, dest)
            raise OutputError(
                f"cannot write {dest} ({exc.strerror or exc}); the finished file is kept as {kept}"
            ) from exc
    finally:
        os.close(fd)


def _keep_finished(tmp: Path, dest: Path) -> Path:
    """Give a finished temporary file a visible name beside ``dest`` (or leave it where it is)."""
    visible = tmp.with_name(f"{dest.name}.unsaved-{os.getpid()}")
    try:
        os.replace(tmp, visible)
        return visible
    except OSError:
        return tmp


def rescue_path(dest: str | os.PathLike[str]) -> Path:
    """A fresh, writable path in the system's temporary folder for results whose ``dest`` failed.

    The file name keeps ``dest``'s name (``cellseg-deploy-rescue-XXXX/NAME``) so the user recognises it.
    """
    folder = Path(tempfile.mkdtemp(prefix="cellseg-deploy-rescue-"))
    return folder / Path(dest).name


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (as anything, a broken link included)."""
    current = path
    while not (current.exists() or current.is_symlink()):
        if current.parent == current:
            break
        current = current.parent
    return current


def _probe_writable(folder: Path) -> str | None:
    """``None`` when a file can be created in ``folder`` (really creating and deleting one), else why not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".cellseg-deploy-probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None


def check_output(
    path: str | os.PathLike[str],
    *,
    what: str = "output",
    folder: bool = False,
    overwrite: bool = False,
    may_exist: bool = False,
    hint: str = "pass --overwrite to replace it, or choose another path",
) -> str | None:
    """Check, before any work, that ``path`` can be written; raise one-line :class:`OutputError` if not.

    The path's folder must exist or be creatable (no file in the way: ``out.zip/x`` under a file ``out.zip``)
    and writable, which is tested by creating and deleting a file there (so ``/proc``, read-only mounts and
    permissions all count). Nothing else is created.

    Args:
        path: the file (or, with ``folder=True``, the folder) the command will write.
        what: how the message names it, e.g. ``"--out"`` or ``"--json"``.
        folder: the output is a folder (it may exist; a non-empty one counts as existing output).
        overwrite: existing output may be replaced (``--overwrite``).
        may_exist: only check that the path can be written (the command has its own rule for what is there,
            as ``train --resume`` does).
        hint: what the refusal of an existing output advises.

    Returns:
        ``None``, or a line to print when existing output will be replaced (``overwrite=True``).

    Raises:
        OutputError: the path cannot be written, or it exists and ``overwrite`` is false.
    """
    path = Path(path)
    existing = _first_existing(path.absolute())
    if existing == path.absolute():
        if folder and not path.is_dir():
            raise OutputError(f"{what} {path} is a file, not a folder; give a folder path")
        if not folder and path.is_dir():
            raise OutputError(f"{what} {path} is a folder; give a file path")
        probe_in = path if folder else path.absolute().parent
    else:
        if not existing.is_dir():
            raise OutputError(
                f"{what} {path} cannot be written: {existing} is a file, not a folder; choose another path"
            )
        probe_in = existing
    reason = _probe_writable(probe_in)
    if reason is not None:
        raise OutputError(
            f"{what} {path} cannot be written: cannot create files in {probe_in} ({reason}); "
            "choose a writable folder"
        )
    present = path.is_file() or (folder and path.is_dir() and any(path.iterdir()))
    if not present or may_exist:
        return None
    kind = "folder holds files" if folder else "file exists"
    if not overwrite:
        raise OutputError(f"{what} {path}: the {kind} already; {hint}")
    if folder:
        return f"writing into {path}, which holds files already: they may be replaced (--overwrite)"
    return f"replacing {path} (--overwrite)"


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``dest`` atomically; returns ``dest`` as a Path."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``dest`` atomically."""
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``dest`` atomically (keys kept in insertion order)."""
    return atomic_write_text(dest, json.dumps(obj, indent=indent) + "\n")


def atomic_write_with(dest: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        writer(tmp)
    return Path(dest)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
