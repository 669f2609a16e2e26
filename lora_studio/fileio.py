"""Safe file reading and atomic writing.

Writes go to a temporary file in the target folder and are renamed into place,
so a crash or a full disk never leaves a half-written file under a final name.
Pickle-based formats are refused unless the caller explicitly allows them. A file given as safetensors that
is something else (a saved web page, a Git LFS pointer, a picture, a pickle) is named for what it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import re
import socket
import struct
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import ExportError, InputFileError, UnsafeFileError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# The safetensors library's own bound (MAX_HEADER_SIZE in its Rust source, 100 MB, not MiB): a header between
# the two limits would pass here only to cost the library a long parse before it refused it anyway.
MAX_HEADER_BYTES = 100_000_000
# A valid header nests 3 levels ({name: {"shape": [...]}}); JSON parsers recurse once per level, so a header of
# 100k ``[`` would exhaust Python's stack. Refuse deep nesting before parsing, with room to spare.
MAX_HEADER_DEPTH = 16
SNIFF_BYTES = 64  # how much of a file is looked at to tell what it is
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
              "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "U32": 32, "U64": 64, "F8_E8M0": 8, "F4": 4,
              "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
SAFETENSORS_DTYPES = set(DTYPE_BITS)


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


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically; metadata values must be strings (the format's rule)."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=meta)


# safetensors dtype names <-> torch dtypes, for the streamed reader and writer below
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SAFETENSORS_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def read_safetensors_tensor(fh, data_start: int, info: Mapping) -> torch.Tensor:
    """One tensor of an open safetensors file (``fh`` in binary mode; ``data_start`` = 8 + header length) read
    with a plain ``readinto``: unlike a memory map, the file's pages are not counted in our resident memory, so
    a streamed pass over a checkpoint holds one tensor at a time. ``info`` is the header entry, already checked
    by ``read_safetensors_header``."""
    dtype = TORCH_DTYPES.get(info["dtype"])
    if dtype is None:
        raise InputFileError(f"tensors of dtype {info['dtype']} cannot be read tensor by tensor here.")
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end == start:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(end - start)
    fh.seek(data_start + start)
    if fh.readinto(buf) != len(buf):
        raise InputFileError(f"{getattr(fh, 'name', 'the file')} ended inside tensor data: it is truncated.")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def write_safetensors_streamed(path: str | os.PathLike, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                               tensors: Iterator[torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file atomically from tensors produced one at a time, in ``layout`` order
    (name, dtype, shape); returns the file size. Only one tensor is in memory at a time.

    Written by hand: ``safetensors.torch.save_file`` needs every tensor in memory at once. The format is a
    little-endian u64 header length, a JSON header (padded with spaces to 8 bytes, as the library does) giving
    each tensor's dtype, shape and [start, end) byte span, then the tensors' bytes back to back. Each produced
    tensor is checked against its declared dtype and shape before a byte of it is written.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in layout:
        if dtype not in SAFETENSORS_NAMES:
            raise ExportError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors.")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            count = 0
            for (name, dtype, shape), t in zip(layout, tensors):
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ExportError(f"tensor {name!r} came out as {t.dtype} {tuple(t.shape)}, not the declared "
                                      f"{dtype} {tuple(shape)}; nothing was written.")
                if t.numel():
                    fh.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                count += 1
            if count != len(layout):
                raise ExportError(f"only {count} of {len(layout)} tensors were produced; nothing was written.")
        return Path(tmp).stat().st_size


def refuse_pickle(path: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Raise ``UnsafeFileError`` for pickle formats unless the user opted in."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeFileError(
            f"{path} is a {suffix} file: loading it means unpickling, which can run arbitrary code. "
            "Use a .safetensors file instead, or pass --allow-pickle if you trust its source "
            "(it is then read with torch.load(weights_only=True)).")


_PICKLE_ADVICE = ("loading it means unpickling, which can run arbitrary code. Use a .safetensors file instead, or, "
                  "if you trust its source, rename it to .ckpt and pass --allow-pickle (it is then read with "
                  "torch.load(weights_only=True)).")


def sniff(head: bytes) -> str | None:
    """What the file starting with ``head`` (its first ``SNIFF_BYTES``) is, when it is one of the files that get
    saved or renamed where model weights were expected: "png", "jpeg", "webp", "pickle", "zip", "lfs" (a Git LFS
    pointer), "html" (a web page or a server's XML reply), "json", "text"; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode, protocol 2-5
        return "pickle"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # the last character may be cut in two; a byte-order mark is not printable but starts many text files
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd").lstrip("\ufeff")
    if not text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    text = text.lstrip(" \t\r\n")
    if text.startswith("version https://git-lfs.github.com/spec/"):
        return "lfs"
    if text.startswith("<"):
        return "html"
    return "json" if text.startswith(("{", "[")) else "text"


def read_head(path: str | os.PathLike) -> bytes:
    """The first ``SNIFF_BYTES`` of a file, for ``sniff``; empty if it cannot be read (the caller reports that)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(SNIFF_BYTES)
    except OSError:
        return b""


def _excerpt(head: bytes) -> str:
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd").lstrip("\ufeff \t\r\n")
    line = text.split("\n", 1)[0].rstrip("\r")
    cut = len(line) > 48 or ("\n" not in text and len(head) == SNIFF_BYTES)
    return repr(line[:48] + ("..." if cut else ""))


def not_weights_error(path: str | os.PathLike, head: bytes) -> InputFileError | None:
    """The error for a file that ``sniff`` recognises as something other than weights (None if it does not):
    it names what the file really is and what to do. A pickle or a PyTorch zip is an ``UnsafeFileError``."""
    p = Path(path)
    kind = sniff(head)
    if kind is None:
        return None
    expected = "a PyTorch checkpoint" if p.suffix.lower() in PICKLE_SUFFIXES else "a safetensors file"
    start = f"{p} is not {expected}: it is"
    if kind in ("png", "jpeg", "webp"):
        return InputFileError(f"{start} a {kind.upper().replace('WEBP', 'WebP')} picture, not model weights (a "
                              "preview image saved under the model's name?). Give the .safetensors file itself, or "
                              "download it again.")
    if kind == "pickle":
        return UnsafeFileError(f"{start} a Python pickle (an old-style PyTorch checkpoint): {_PICKLE_ADVICE}")
    if kind == "zip":
        try:
            with zipfile.ZipFile(p) as archive:  # reads the list of members only; nothing is unpickled
                torch_zip = any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist())
        except Exception:  # a damaged zip raises several types; it is then no checkpoint torch could read either
            torch_zip = False
        if torch_zip:
            return UnsafeFileError(f"{start} a PyTorch checkpoint in torch.save's zip format (a pickle, as "
                                   f".ckpt and .pt files are): {_PICKLE_ADVICE}")
        return InputFileError(f"{start} a zip archive. Unpack it and give the .safetensors file inside.")
    if kind == "lfs":
        return InputFileError(f"{start} a Git LFS pointer, a small text file that stands for the real weights: "
                              "the repository was cloned without Git LFS. Run `git lfs install` and then "
                              "`git lfs pull` in that repository, or download the file itself.")
    what = {"html": "a web page (HTML/XML)", "json": "JSON text", "text": "plain text"}[kind]
    start = f"{start} {what}, starting {_excerpt(head)}"
    if kind == "html":
        return InputFileError(f"{start}: the download failed and the site's page (a login, error or expired-link "
                              "page) was saved instead of the model. Download it again, logged in if the site "
                              "asks, and check that the file's size is what the site says.")
    if kind == "json":
        return InputFileError(f"{start}: a download site's error reply saved under the model's name, or a "
                              "metadata file (name.json, name.civitai.info) given instead of the model. Give the "
                              ".safetensors file itself, or download it again, logged in if the site asks.")
    return InputFileError(f"{start}: not model weights (a download's error message saved under the model's "
                          "name?). Download the file again and check that its size is what the site says.")


def _too_deep(raw: bytes, limit: int) -> bool:
    """True when the JSON text ``raw`` nests more than ``limit`` levels, found without parsing it.

    Brackets inside strings do not count: escapes go first, so the quotes left are the ones that open and close
    strings; removing two adjacent quotes never moves a bracket into or out of a string, so the many strings
    without brackets (names, dtypes) vanish at C speed, and the regex only meets the rare ones with brackets.
    """
    s = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_BRACKET_OR_QUOTE).replace(b'""', b"")
    s = re.sub(rb'"[^"]*"', b"", s)
    if re.search(rb"[\[{]{%d}" % (limit + 1), s):  # the usual attack, a long run of openers, costs one search
        return True
    return max(itertools.accumulate(memoryview(s.translate(_BRACKET_STEP)).cast("b")), default=0) > limit


_NOT_BRACKET_OR_QUOTE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes


def _corrupt(p: Path, what: str) -> InputFileError:
    return InputFileError(f"{p} is not a valid safetensors file: {what}. The file is damaged or was cut off "
                          "while downloading: download or export it again.")


def _check_entry(p: Path, name: str, info: object, data_len: int) -> tuple[int, int]:
    """Check one tensor entry as the safetensors library would; returns its (start, end) byte span."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise _corrupt(p, f"tensor entry {name!r} is malformed (it needs dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _corrupt(p, f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(sorted(SAFETENSORS_DTYPES))})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _corrupt(p, f"tensor {name!r} has shape {shape!r}; a shape is a list of whole numbers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise _corrupt(p, f"tensor {name!r} has data_offsets {offsets!r}; they must be two whole numbers [start, end]")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise _corrupt(p, f"tensor {name!r} points outside the file (offsets {start}..{end}, the data is "
                          f"{data_len} bytes); it is truncated or corrupt")
    numel = math.prod(shape)
    if (end - start) * 8 != numel * DTYPE_BITS[dtype]:
        raise _corrupt(p, f"tensor {name!r} has shape {shape} of {dtype}, which needs "
                          f"{numel * DTYPE_BITS[dtype] / 8:g} bytes, but its offsets span {end - start} bytes")
    return start, end


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Read and check a safetensors header without loading tensors.

    Returns ``(entries, metadata)`` where entries maps tensor names to their
    ``{"dtype", "shape", "data_offsets"}``. Every way a header can be corrupt (the checks the safetensors
    library makes on load: header bound, JSON, dtypes, shapes, byte sizes, spans that tile the data exactly)
    becomes an ``InputFileError`` naming the file, so header-only readers refuse what a full load would.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p} does not exist. Check the path.")
    if p.is_dir():
        raise InputFileError(f"{p} is a folder, but a .safetensors file was expected. Give the file inside it.")
    refuse_pickle(p)  # a pickle has no safetensors header; say why it is not read rather than "corrupt"
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
            n = struct.unpack("<Q", head[:8])[0] if size >= 8 else 0
            # Only a file that cannot be safetensors is sniffed: a valid one may start with any length bytes.
            if size < 8 or n > min(MAX_HEADER_BYTES, size - 8) or head[8:9] != b"{":
                foreign = not_weights_error(p, head)
                if foreign is not None:
                    raise foreign
            if size < 8:
                raise InputFileError(f"{p} is {size} bytes long: too short to be a safetensors file (it is empty "
                                     "or was cut off while downloading). Download or export it again.")
            if n > MAX_HEADER_BYTES:
                raise _corrupt(p, f"its header length field says {n:,} bytes, more than the safetensors limit of "
                                  f"{MAX_HEADER_BYTES:,} bytes for a header")
            if n > size - 8:
                raise _corrupt(p, f"its header claims {n} bytes but the file has only {size}; it is truncated")
            fh.seek(8)
            raw = fh.read(n)
    except OSError as err:
        raise InputFileError(f"cannot read {p}: {err.strerror or err}. Check the file's permissions.") from err
    if _too_deep(raw, MAX_HEADER_DEPTH):
        raise _corrupt(p, f"its header nests more than {MAX_HEADER_DEPTH} levels deep (a safetensors header "
                          "nests 3), so it is not a safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # RecursionError: see _too_deep
        raise _corrupt(p, f"its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise _corrupt(p, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(p, "its __metadata__ is not an object of strings")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data_len = size - 8 - n
    spans = sorted((*_check_entry(p, name, info, data_len), name) for name, info in header.items())
    pos, prev = 0, None
    for start, end, name in spans:
        if start < pos:
            raise _corrupt(p, f"tensors {prev!r} and {name!r} overlap")
        if start > pos:
            raise _corrupt(p, f"bytes {pos}..{start} of the data belong to no tensor")
        pos, prev = end, name
    if pos != data_len:
        raise _corrupt(p, f"{data_len - pos} bytes after the last tensor belong to no tensor; it is truncated "
                          "or was joined with other data")
    return header, metadata


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file, with corruption turned into clear errors."""
    _, metadata = read_safetensors_header(path)
    try:
        tensors = load_file(str(path), device=device)
    except Exception as err:  # the library raises several types for corrupt data
        raise InputFileError(f"{path} could not be read as safetensors: {err}. Download it again.") from err
    return tensors, metadata


def weights_only_refusal(path: str | os.PathLike, err: BaseException) -> UnsafeFileError | None:
    """The error to show when ``err`` (or an error it was raised from, as diffusers re-raises) is
    ``torch.load(weights_only=True)`` refusing a pickle that holds more than tensors; None otherwise."""
    while err is not None:
        text = str(err)
        if "weights_only" in text or "Weights only" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            what = f" (it refers to {found.group(1)})" if found else ""
            return UnsafeFileError(f"{path} holds objects other than plain tensors{what}, so it was not loaded: "
                                   "torch.load(weights_only=True) refuses them, as unpickling them could run code. "
                                   "Convert it to .safetensors with a tool you trust, or use another file.")
        err = err.__cause__ or err.__context__
    return None


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load weights from ``.safetensors`` (always) or a pickle format (only with ``allow_pickle``)."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(p, allow_pickle)
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            # first: torch's refusal of a Git LFS pointer or a web page named .ckpt also says "Weights only"
            foreign = not_weights_error(p, read_head(p))
            if foreign is not None and not isinstance(foreign, UnsafeFileError):
                raise foreign from err
            refused = weights_only_refusal(p, err)
            if refused is not None:
                raise refused from err
            raise InputFileError(f"{p} could not be read as a PyTorch checkpoint ({err}); it is damaged or not a "
                                 "checkpoint. Download it again, or use a .safetensors file.") from err
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputFileError(f"{p} holds a {type(obj).__name__}, not a dict of tensors; it is not a model "
                                 "checkpoint. Give a .safetensors file.")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    return load_safetensors(p)
