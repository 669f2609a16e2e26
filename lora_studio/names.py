"""Names that become file or folder names (run names, LoRA output names, export names), and file names shown as
text. One rule for every name, so the CLI, the GUI and presets refuse the same things.

File names on Linux are bytes; Python shows bytes that are not UTF-8 (a Latin-1 ``café.png``) as lone
surrogates, which tokenizers, JSON encoders and safetensors metadata refuse. ``as_text`` turns such a name
into ordinary text for captions, messages and metadata; the path itself is kept as it is to open the file.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from .errors import ConfigError, LoraStudioError

# Bytes tried after UTF-8, in order: Windows-1252 (older Windows tools), then Latin-1, which decodes any byte.
LEGACY_ENCODINGS = ("cp1252", "latin-1")
# File systems allow 255 bytes per name; a LoRA name gets "-step000123.safetensors" and a temporary-file
# prefix and suffix added, so names stay well under that.
MAX_NAME_BYTES = 150
_FORBIDDEN = set('/\\<>:"|?*')  # folder separators, and characters Windows refuses in a file name
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def decode_bytes(raw: bytes) -> tuple[str, str]:
    """``(text, encoding)``: UTF-8 when the bytes are UTF-8, else the first legacy encoding that decodes them."""
    for enc in ("utf-8", *LEGACY_ENCODINGS):
        try:
            return raw.decode(enc), enc
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte string")  # unreachable


def as_text(text: str) -> str:
    """``text`` (a file name or path from the OS) as valid Unicode: surrogate-escaped bytes decoded leniently."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return decode_bytes(os.fsencode(text))[0]


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one plain file or folder name inside an output folder; None when it can."""
    if not name.strip():
        return "it is empty"
    if name != name.strip():
        return "it starts or ends with a space"
    bad = sorted(set(name) & _FORBIDDEN)
    if bad:
        return f"it contains {' '.join(bad)} (folder separators or characters Windows forbids)"
    if name.startswith("."):
        return "it starts with a dot (a hidden file, or a way up out of the folder)"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "it contains control characters"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it holds bytes that are not valid text"
    if size > MAX_NAME_BYTES:
        return f"it is {size} bytes long, over the limit of {MAX_NAME_BYTES}"
    if name.split(".")[0].upper() in _WINDOWS_DEVICES:
        return "Windows reserves it for a device"
    return None


def check_name(name: str, what: str, error: type[LoraStudioError] = ConfigError) -> str:
    """``name`` when it is a plain file name; else ``error`` naming ``what``, the name and the reason."""
    problem = name_problem(name)
    if problem:
        raise error(f"{what} {name!r} must be a plain name: {problem}. Use letters, digits, spaces and . _ - "
                    "(no slashes), e.g. 'my-style-v2'.")
    return name


def next_free_path(path: str | Path, suffix: str | None = None, width: int = 4) -> Path:
    """``path`` when nothing is there yet; else the first free ``<stem>-0001<suffix>``, ``<stem>-0002<suffix>``, ...
    beside it, so a new output never replaces an earlier one. ``suffix`` defaults to the path's own (give ``""``
    for a folder whose name holds dots)."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    if not path.exists() and not path.is_symlink():
        return path
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    n = 1
    while True:
        candidate = path.with_name(f"{stem}-{n:0{width}d}{suffix}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
        n += 1
