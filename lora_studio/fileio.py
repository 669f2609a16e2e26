"""Safe file reading and atomic writing.

Writes go to a temporary file in the target folder and are renamed into place,
so a crash or a full disk never leaves a half-written file under a final name.
Pickle-based formats are refused unless the caller explicitly allows them.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file

from .errors import ExportError, InputFileError, UnsafeFileError

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own bound on header size
SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                      "F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
        os.close(fd)
    except OSError as err:
        raise ExportError(f"cannot write into {final.parent}: {err.strerror or err}. "
                          "Choose a folder you can write to.") from err
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except OSError as err:
        raise ExportError(f"could not write {final}: {err.strerror or err}. "
                          "Free some disk space or choose another folder; nothing was overwritten.") from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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


def refuse_pickle(path: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Raise ``UnsafeFileError`` for pickle formats unless the user opted in."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeFileError(
            f"{path} is a {suffix} file: loading it means unpickling, which can run arbitrary code. "
            "Use a .safetensors file instead, or pass --allow-pickle if you trust its source "
            "(it is then read with torch.load(weights_only=True)).")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Read and check a safetensors header without loading tensors.

    Returns ``(entries, metadata)`` where entries maps tensor names to their
    ``{"dtype", "shape", "data_offsets"}``. Every way a header can be corrupt
    becomes an ``InputFileError`` naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p} does not exist. Check the path.")
    if p.is_dir():
        raise InputFileError(f"{p} is a folder, but a .safetensors file was expected.")
    size = p.stat().st_size
    if size < 8:
        raise InputFileError(f"{p} is {size} bytes long: too short to be a safetensors file "
                             "(it is empty or was cut off while downloading). Download it again.")
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise InputFileError(f"{p} is not a valid safetensors file: its header claims {n} bytes but the "
                                 f"file has {size}. It is truncated or not a safetensors file.")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputFileError(f"{p} is not a valid safetensors file: its header is not JSON ({err}).") from err
    if not isinstance(header, dict):
        raise InputFileError(f"{p} is not a valid safetensors file: its header is not a JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputFileError(f"{p}: __metadata__ must be an object of strings.")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise InputFileError(f"{p}: tensor entry {name!r} is malformed.")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise InputFileError(f"{p}: tensor {name!r} has unknown dtype {info['dtype']!r}.")
        start, end = info["data_offsets"]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise InputFileError(f"{p}: tensor {name!r} points outside the file (offsets {start}..{end}, "
                                 f"data is {data_len} bytes). The file is truncated or corrupt.")
        spans.append((start, end, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise InputFileError(f"{p}: tensors {n0!r} and {n1!r} overlap; the file is corrupt.")
    return header, metadata


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load all tensors and the metadata of a safetensors file, with corruption turned into clear errors."""
    _, metadata = read_safetensors_header(path)
    try:
        tensors = load_file(str(path), device=device)
    except Exception as err:  # the library raises several types for corrupt data
        raise InputFileError(f"{path} could not be read as safetensors: {err}. Download it again.") from err
    return tensors, metadata


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load weights from ``.safetensors`` (always) or a pickle format (only with ``allow_pickle``)."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(p, allow_pickle)
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnsafeFileError(f"{p} could not be loaded with weights_only=True ({err}); "
                                  "it holds more than plain tensors. Convert it to .safetensors.") from err
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputFileError(f"{p} does not hold a dict of tensors.")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}
    return load_safetensors(p)
