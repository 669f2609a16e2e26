"""Scan a user's model folders into LoRA entries and checkpoint entries.

What a file holds (SHA-256, family, kind, rank, its own trigger words, or why it cannot be used) is cached by
path, size and modification time, so a rescan of an unchanged library only lists folders and reads sidecars.
Files that cannot be used (broken, not a LoRA, a training run's internal state) are listed with ``problem``
set, never hidden."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import LoraStudioError
from ..fileio import PICKLE_SUFFIXES
from ..lora.inspect import inspect_lora, looks_like_checkpoint
from ..models import describe_checkpoint
from ..progress import ProgressCallback, report
from ..fileio import file_sha256
from .cache import ScanCache, autov2
from .folders import ModelFolders
from .sidecars import read_sidecars

WEIGHT_SUFFIXES = (".safetensors",) + tuple(sorted(PICKLE_SUFFIXES))
STEP_FOLDER = re.compile(r"^step-\d+$")
PICKLE_PROBLEM = "{suffix} files need unpickling, which can run code; convert it to .safetensors to use it"
INTERNAL_PROBLEM = ("a training run's internal state (kept to resume training), not a finished LoRA; use the "
                    "run's final .safetensors file instead")


@dataclass
class CheckpointEntry:
    """What the library knows of a model file; a checkpoint has nothing more."""

    path: Path
    name: str
    family: str | None = None
    sha256: str | None = None
    autov2: str | None = None
    problem: str | None = None        # None, or why it cannot be used


@dataclass
class LoraEntry(CheckpointEntry):
    """A LoRA: the checkpoint's fields, what the inspector reads and what the ecosystem keeps beside it."""

    kind: str | None = None
    rank: int | None = None
    preview: Path | None = None
    trigger_words: list[str] = field(default_factory=list)
    activation_text: str | None = None
    preferred_weight: float | None = None
    civitai: dict[str, str | None] | None = None


@dataclass
class ModelLibrary:
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    loras: list[LoraEntry] = field(default_factory=list)

    def to_json(self) -> dict[str, list[dict[str, Any]]]:
        def plain(entry) -> dict[str, Any]:
            return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(entry).items()}
        return {"checkpoints": [plain(c) for c in self.checkpoints], "loras": [plain(lo) for lo in self.loras]}


def _walk(root: Path) -> Iterator[tuple[Path, set[str], list[str]]]:
    """(folder, names of every file in it, its weight files) under ``root``; hidden entries skipped. Linked
    folders are followed (libraries are often spread over disks by links), each real folder once."""
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:             # a link back up the tree, or a second link to the same folder
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        weights = sorted(f for f in filenames if not f.startswith(".") and f.lower().endswith(WEIGHT_SUFFIXES))
        if weights:
            yield Path(dirpath), names, weights


def is_training_internal(path: Path) -> bool:
    """A file inside a training run's ``state/`` folder (``runs/x/state/step-000100/adapter.safetensors``)."""
    parents = path.parent.parts
    return "state" in parents or any(STEP_FOLDER.match(p) for p in parents[-2:])


def _name(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _failure(err: Exception) -> str:
    return str(err) if isinstance(err, LoraStudioError) else f"{type(err).__name__}: {err}"


def _hash(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def _inspect_lora_file(path: Path) -> dict[str, Any]:
    """What the file itself says (the cached part of a LoRA entry)."""
    data: dict[str, Any] = {"sha256": _hash(path), "family": None, "kind": None, "rank": None,
                            "trigger_words": [], "problem": None}
    if path.suffix.lower() in PICKLE_SUFFIXES:
        data["problem"] = PICKLE_PROBLEM.format(suffix=path.suffix)
        return data
    try:
        if looks_like_checkpoint(path):
            data["problem"] = ("a full model (checkpoint), not a LoRA: move it to the checkpoints folder "
                               "(models/Stable-diffusion or models/checkpoints)")
            return data
        info = inspect_lora(path)
    except Exception as err:  # a broken file, or a bug in a reader: listed with the reason, never fatal
        data["problem"] = _failure(err)
        return data
    ranks = [m.rank for m in info.modules if m.rank]
    data.update(family=getattr(info.family, "value", info.family), kind=", ".join(info.kinds) or None,
                rank=max(ranks) if ranks else None, trigger_words=list(info.trigger_words), problem=info.problem)
    return data


def _inspect_checkpoint_file(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = {"sha256": _hash(path), "family": None, "problem": None}
    if path.suffix.lower() in PICKLE_SUFFIXES:
        data["problem"] = PICKLE_PROBLEM.format(suffix=path.suffix)
        return data
    try:
        desc = describe_checkpoint(path)
    except Exception as err:
        data["problem"] = _failure(err)
        return data
    data["family"] = getattr(desc["family"], "value", desc["family"])
    data["problem"] = desc.get("family_error")
    return data


def _cached(cache: ScanCache, path: Path, read) -> dict[str, Any]:
    try:
        stat = path.stat()
    except OSError as err:
        return {"sha256": None, "problem": f"cannot read the file ({err})"}
    data = cache.get(path, stat)
    if data is None:
        data = read(path)
        cache.put(path, stat, data)
    return data


def _unique(words: list[str]) -> list[str]:
    seen: set[str] = set()
    return [w for w in words if not (w.lower() in seen or seen.add(w.lower()))]


def _lora_entry(path: Path, root: Path, names: set[str], cache: ScanCache) -> LoraEntry:
    data = _cached(cache, path, _inspect_lora_file)
    side = read_sidecars(path, names)
    problem = INTERNAL_PROBLEM if is_training_internal(Path(root.name) / path.relative_to(root)) else data.get("problem")
    return LoraEntry(path=path, name=_name(path, root), family=data.get("family"), kind=data.get("kind"),
                     rank=data.get("rank"), sha256=data.get("sha256"), autov2=autov2(data.get("sha256")),
                     preview=side.preview, trigger_words=_unique(side.trigger_words + list(data.get("trigger_words", []))),
                     activation_text=side.activation_text, preferred_weight=side.preferred_weight,
                     civitai=side.civitai, problem=problem)


def _checkpoint_entry(path: Path, root: Path, cache: ScanCache) -> CheckpointEntry:
    data = _cached(cache, path, _inspect_checkpoint_file)
    return CheckpointEntry(path=path, name=_name(path, root), family=data.get("family"), sha256=data.get("sha256"),
                           autov2=autov2(data.get("sha256")), problem=data.get("problem"))


def scan_models(folders: ModelFolders, cache: ScanCache | str | os.PathLike | None = None,
                progress: ProgressCallback | None = None) -> ModelLibrary:
    """Every checkpoint and LoRA file in ``folders``, each once (a file reached through two folders is listed
    under the first), sorted by name. ``cache`` is a ``ScanCache`` or the path of its JSON file (saved at the
    end); None scans without one."""
    store = cache if isinstance(cache, ScanCache) else ScanCache(cache)
    jobs: list[tuple[str, Path, Path, set[str]]] = []
    seen: set[str] = set()
    for kind in ("checkpoints", "loras"):
        for root in folders.folders[kind]:
            for folder, names, weights in _walk(root):
                for fn in weights:
                    real = os.path.realpath(folder / fn)
                    if real not in seen:
                        seen.add(real)
                        jobs.append((kind, folder / fn, root, names))
    library = ModelLibrary()
    for i, (kind, path, root, names) in enumerate(jobs):
        if kind == "loras":
            library.loras.append(_lora_entry(path, root, names, store))
        else:
            library.checkpoints.append(_checkpoint_entry(path, root, store))
        report(progress, "scan", i + 1, len(jobs), path.name)
    library.checkpoints.sort(key=lambda e: (e.name.lower(), str(e.path)))
    library.loras.sort(key=lambda e: (e.name.lower(), str(e.path)))
    store.save()
    return library
