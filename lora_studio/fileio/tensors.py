"""Checked safetensors reading (the header is checked before anything is loaded) and writing (atomic, or
streamed tensor by tensor); pickles only when allowed, and then with ``weights_only``."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load_file, save, save_file

from ..errors import ExportError, InputFileError, UnsafeFileError
from .atomic import atomic_path
from .sniff import PICKLE_SUFFIXES, SNIFF_BYTES, not_weights_error, read_head, refuse_pickle, weights_only_refusal

# The safetensors library's own bound (MAX_HEADER_SIZE in its Rust source, 100 MB, not MiB): a header between
# the two limits would pass here only to cost the library a long parse before it refused it anyway.
MAX_HEADER_BYTES = 100_000_000
# A valid header nests 3 levels ({name: {"shape": [...]}}); JSON parsers recurse once per level, so a header of
# 100k ``[`` would exhaust Python's stack. Refuse deep nesting before parsing, with room to spare.
MAX_HEADER_DEPTH = 16
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
              "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "U16": 16, "U32": 32, "U64": 64, "F8_E8M0": 8, "F4": 4,
              "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
SAFETENSORS_DTYPES = set(DTYPE_BITS)


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically; metadata values must be strings (the format's rule)."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=meta)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 of the whole file, hex (A1111's AutoV2 is its first 10 digits; merged files record it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_data_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The SHA-256 (hex) of the tensor data of the safetensors file ``save_safetensors_atomic`` writes for
    ``tensors``: the bytes after the header, which A1111 ("addnet" hash) and kohya (``sshs_model_hash``) hash.
    The data does not depend on the metadata, so a writer can put this hash into the header it writes."""
    blob = save({k: v.detach().contiguous() for k, v in tensors.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(memoryview(blob)[8 + n:]).hexdigest()


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
