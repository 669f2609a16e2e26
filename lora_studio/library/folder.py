"""The LoRA folder: list its files with what the inspector says about each, and find a file by name.

A LoRA's name is its path inside the folder without the suffix (``style/stripes`` for
``style/stripes.safetensors``), as A1111's LoRA folder does; a plain stem works too when it is unique.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputFileError, LoraStudioError
from ..fileio import PICKLE_SUFFIXES as _PICKLES
from ..progress import ProgressCallback, report
from ..lora.inspect import inspect_lora

LORA_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = tuple(sorted(_PICKLES))   # listed with an error: we never unpickle while browsing


@dataclass
class LibraryItem:
    name: str
    path: Path
    family: str | None = None          # "sd1" / "sd2" / "sdxl", None when unknown
    kind: str | None = None            # "LoRA", "LoCon", "LoHa", "LoKr", "DoRA", ...
    rank: int | None = None            # the largest rank of its modules
    trigger_words: list[str] = field(default_factory=list)
    size: int = 0                      # bytes
    error: str | None = None           # why the file could not be inspected (the item is still listed)


def _folder(folder: str | Path) -> Path:
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise InputFileError(f"LoRA folder {p} does not exist or is not a folder. Check the path.")
    return p


def list_lora_files(folder: str | Path, include_pickles: bool = False) -> list[Path]:
    """Every LoRA file under ``folder`` (recursively, hidden and partial files skipped), sorted by name."""
    root = _folder(folder)
    suffixes = LORA_SUFFIXES + (PICKLE_SUFFIXES if include_pickles else ())
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(suffixes):
                found.append(Path(dirpath) / fn)
    return sorted(found, key=lambda p: lora_name(p, root).lower())


def lora_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.with_suffix("").as_posix()


def _item_from_info(name: str, path: Path, size: int, info: Any) -> LibraryItem:
    """One list row from the inspector's ``LoraInfo`` (a file the reader refused keeps its reason as ``error``)."""
    family = getattr(info.family, "value", info.family)
    ranks = [m.rank for m in info.modules if m.rank]
    return LibraryItem(name, path, family, ", ".join(info.kinds) or None, max(ranks) if ranks else None,
                       list(info.trigger_words), size, info.problem)


def scan_library(folder: str | Path, progress: ProgressCallback | None = None) -> list[LibraryItem]:
    """Inspect every LoRA file in ``folder``. A file that cannot be read becomes an item with ``error`` set;
    one bad download never hides the rest of the folder."""

    root = _folder(folder)
    files = list_lora_files(root, include_pickles=True)
    items = []
    for i, path in enumerate(files):
        name = lora_name(path, root)
        size = path.stat().st_size
        if path.suffix.lower() in PICKLE_SUFFIXES:
            items.append(LibraryItem(name, path, size=size, error=(
                f"{path.suffix} files need unpickling, which can run code; convert it to .safetensors to use it")))
        else:
            try:
                items.append(_item_from_info(name, path, size, inspect_lora(path)))
            except LoraStudioError as err:
                items.append(LibraryItem(name, path, size=size, error=str(err)))
            except Exception as err:  # a bug in a reader must not hide the rest of the folder either
                items.append(LibraryItem(name, path, size=size, error=f"{type(err).__name__}: {err}"))
        report(progress, "scan", i + 1, len(files), name)
    return items


def available_names(folder: str | Path) -> list[str]:
    root = _folder(folder)
    return [lora_name(p, root) for p in list_lora_files(root)]


def resolve(name: str, folder: str | Path) -> Path:
    """The file for LoRA ``name`` in ``folder``: by path inside the folder, else by a unique stem (case
    forgiven). An existing file path is returned as it is."""
    direct = Path(name).expanduser()
    if direct.suffix.lower() in LORA_SUFFIXES and direct.is_file():
        return direct
    root = _folder(folder)
    files = list_lora_files(root)
    key = name[:-len(".safetensors")] if name.lower().endswith(".safetensors") else name
    key = key.replace("\\", "/")
    for matcher in (lambda p: lora_name(p, root) == key,
                    lambda p: lora_name(p, root).lower() == key.lower(),
                    lambda p: p.stem == key,
                    lambda p: p.stem.lower() == key.lower()):
        hits = [p for p in files if matcher(p)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InputFileError(f"LoRA name {name!r} matches several files in {root}: "
                                 f"{', '.join(lora_name(p, root) for p in hits)}. Use the name with its folder.")
    names = [lora_name(p, root) for p in files]
    shown = ", ".join(names[:30]) + (f" (and {len(names) - 30} more)" if len(names) > 30 else "")
    raise InputFileError(f"no LoRA named {name!r} in {root}. "
                         + (f"It holds: {shown}. " if names else "It holds no .safetensors files. ")
                         + "Fix the name or put the file in that folder.")
