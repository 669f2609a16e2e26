"""Atomic writes: a temporary file (or folder) in the target folder, renamed into place, so a crash or a full
disk never leaves a half-written file under a final name; what killed writers left behind is cleaned up."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator


from ..errors import ExportError


def is_write_failure(err: BaseException) -> bool:
    """True when ``err`` means a file could not be written (disk full, file too large, I/O error).

    Written by hand because the writers do not all raise ``OSError``: safetensors raises ``SafetensorError``
    ("I/O error: No space left on device") and ``torch.save`` a ``RuntimeError`` from its stream writer.
    """
    if isinstance(err, OSError):
        return True
    text = str(err)
    if type(err).__name__ == "SafetensorError":
        return "I/O error" in text or "os error" in text
    if isinstance(err, RuntimeError):
        return any(s in text for s in ("PytorchStreamWriter", "inline_container", "file write failed"))
    return False


def _write_error(final: Path, err: BaseException, folder: bool = False) -> ExportError:
    if final.is_dir() and not folder:
        return ExportError(f"could not write {final}: a folder of that name is in the way. "
                           "Choose another file name, or move that folder.")
    why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return ExportError(f"could not write {final}: {why}. Free some disk space or choose another folder; "
                       "nothing was overwritten.")


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


# Temporary names: ".{final name}.{pid}-{host}.{8 random}.part". The pid and a tag of the machine let a later write
# tell a killed writer's leftovers from a live writer's file; names without them are from earlier versions.
# (".+?" is lazy so that a name with a pid is never read as an old one, the pid being part of ".+")
_TEMP_NAME = re.compile(r"^\..+?\.(?:(\d+)-([0-9a-f]{6})\.)?[a-z0-9_]{8}\.part$")
STALE_TEMP_S = 3600.0      # unmodified this long, a temporary no live process of this machine owns is stale
DEAD_OWNER_GRACE_S = 60.0  # a dead owner's too: the pid may be of a container that shares the folder and host name


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode(), usedforsecurity=False).hexdigest()[:6]


def _temp_prefix(final: Path) -> str:
    # the name is cut so that the prefix and mkstemp's 13 characters fit a 255-byte file name
    return f".{final.name.encode()[:200].decode('utf-8', 'ignore')}.{os.getpid()}-{_host_tag()}."


def _owner_alive(pid: int) -> bool | None:
    """Whether process ``pid`` of this machine runs; None where that cannot be told (on Windows os.kill would
    end the process, not probe it)."""
    if os.name == "nt":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OSError, OverflowError):
        return None
    return True


def _last_change(path: Path) -> float:
    """When a temporary file, or anything in a temporary folder, last changed (a folder's own time does not
    change while a file inside one of its subfolders is written)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete what atomic writes that never finished (kill -9, a power cut) left in ``folder``; returns it.

    Only names of this module's pattern are touched. One whose process (of this machine) still runs is kept
    whatever its age; a dead process's is removed once unmodified for ``DEAD_OWNER_GRACE_S``; any other
    (an earlier version's name, another machine's on a shared folder) once unmodified for ``STALE_TEMP_S``.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now, host = time.time(), _host_tag()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or entry.is_symlink():
            continue
        path = Path(entry.path)
        pid, tag = match.groups()
        alive = _owner_alive(int(pid)) if pid and tag == host else None
        try:
            idle = now - _last_change(path)
            if alive or idle < (DEAD_OWNER_GRACE_S if alive is False else STALE_TEMP_S):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:  # gone already (another writer cleaned up first) or not ours to delete: leave it
            continue
    return removed


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    A write failure inside the block (see ``is_write_failure``) becomes an ``ExportError``; the temporary
    file is always removed, and an existing ``final`` is left exactly as it was.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final.parent)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".part", dir=final.parent)
        os.close(fd)
    except OSError as err:
        raise ExportError(f"cannot write into {final.parent}: {err.strerror or err}. "
                          "Choose a folder you can write to.") from err
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file owner-only (0600); give it the mode a plain open() would, so another user's
        # A1111 or ComfyUI can read what we export.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    except Exception as err:
        if is_write_failure(err):
            raise _write_error(final, err) from err
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Like ``atomic_path`` for a folder (a diffusers model): fill the yielded temporary folder; on success it
    replaces ``final`` (an existing folder is moved aside first and put back if the swap fails)."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise ExportError(f"{final} exists and is not a folder; choose another name for the folder.")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=".part", dir=final.parent))
    except OSError as err:
        raise ExportError(f"cannot write into {final.parent}: {err.strerror or err}. "
                          "Choose a folder you can write to.") from err
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        yield tmp
        _replace_folder(tmp, final)
    except Exception as err:
        if is_write_failure(err):
            raise _write_error(final, err, folder=True) from err
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(tmp: Path, final: Path) -> None:
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
    try:
        os.replace(tmp, final)
    except OSError:
        if backup is not None:
            os.replace(backup, final)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


