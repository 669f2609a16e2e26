"""Re-render a picture made by A1111 or by LoRA Studio: read its "parameters" (the infotext), find its LoRAs and
its checkpoint in the user's folders by name or by hash, and say what could not be found.

LoRAs come from the prompt's ``<lora:name:w>`` tags; the ``Lora hashes`` field (``name: hash, ...``) finds a
file that was renamed. A hash there is matched as a prefix of either the file's SHA-256 (AutoV2) or the SHA-256
of its tensor data (A1111's own short LoRA hash), so both spellings work. The checkpoint is found by its
``Model`` name or its ``Model hash`` (AutoV2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..library import ModelLibrary, gather_folders, scan_models
from ..render import GenParams, canonical_sampler, lora_hash, parse_infotext, read_png_parameters
from .args import SlotSpec


@dataclass
class PngRecipe:
    """What a PNG asks for, as far as it was found here. ``base`` is None when no checkpoint was found."""

    params: GenParams
    slots: list[SlotSpec] = field(default_factory=list)
    base: str | None = None
    notes: list[str] = field(default_factory=list)


def parse_lora_hashes(text: str) -> dict[str, str]:
    """A1111's ``Lora hashes`` value (``"a: 0123456789ab, b: ..."``) as ``{name: hash}`` (hashes lower-case)."""
    out = {}
    for part in (text or "").split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip() and value.strip():
            out[name.strip()] = value.strip().lower()
    return out


def _hash_matches(wanted: str, entry, extra_hash) -> bool:
    if len(wanted) < 8:
        return False
    if entry.sha256 and entry.sha256.lower().startswith(wanted):
        return True
    return bool(extra_hash and extra_hash(entry).startswith(wanted))


def _find(name: str, wanted_hash: str | None, entries: Sequence, extra_hash=None):
    """The entry named ``name`` (path in its folder, or a unique stem; case forgiven), else the one whose hash
    matches; (entry, how it was found) or (None, "")."""
    for same in (lambda a, b: a == b, lambda a, b: a.lower() == b.lower()):
        hits = [e for e in entries if not e.problem and (same(e.name, name) or same(Path(e.name).name, name))]
        if len(hits) == 1:
            return hits[0], "name"
    if wanted_hash:
        hits = [e for e in entries if not e.problem and _hash_matches(wanted_hash, e, extra_hash)]
        if hits:
            return hits[0], "hash"
    return None, ""


def recipe_from_png(png: str | Path, lora_dir: str | None = None, model_dirs: Sequence[str] = (),
                    base: str | None = None) -> PngRecipe:
    """Read ``png`` and find what it needs in ``lora_dir`` and ``model_dirs`` (scanned as the model library).
    ``base`` given: that checkpoint is used and none is looked up. What is missing goes into ``notes``."""
    data = parse_infotext(read_png_parameters(png))
    extra = dict(data["extra"])
    names = {"prompt", "negative_prompt", "steps", "cfg", "seed", "width", "height", "model_name", "model_hash",
             "clip_skip"}
    params = GenParams(**{k: v for k, v in data.items() if k in names and k != "model_hash"})
    notes: list[str] = []
    if "sampler" in data:
        try:
            params = replace(params, sampler=canonical_sampler(data["sampler"]))
        except ConfigError:
            notes.append(f"sampler {data['sampler']!r} is not available here; using {params.sampler} "
                         "(choose another with --sampler).")
    folders = gather_folders(lora_dirs=[lora_dir] if lora_dir else [], model_dirs=list(model_dirs))
    library = scan_models(folders) if (lora_dir or model_dirs) else ModelLibrary()
    hashes = parse_lora_hashes(extra.get("Lora hashes", ""))
    addnet: dict[Path, str] = {}

    def tensor_hash(entry) -> str:
        if entry.path not in addnet:
            addnet[entry.path] = lora_hash(entry.path)
        return addnet[entry.path]

    recipe = PngRecipe(params, base=base, notes=notes)
    for name, strength, te in data["loras"]:
        entry, how = _find(name, hashes.get(name), library.loras, tensor_hash)
        if entry is None:
            where = f"in {lora_dir}" if lora_dir else "(no --lora-dir given)"
            by_hash = f" or hash {hashes[name]}" if name in hashes else ""
            notes.append(f"LoRA {name!r} not found by name{by_hash} {where}; rendering without it.")
            continue
        if how == "hash":
            notes.append(f"LoRA {name!r} found by its hash as {entry.path}.")
        recipe.slots.append(SlotSpec(str(entry.path), strength, te, name=name))
    if base is None:
        recipe.base = _find_base(data.get("model_name"), data.get("model_hash"), library, model_dirs, notes)
    return recipe


def _find_base(name: str | None, wanted_hash: str | None, library: ModelLibrary, model_dirs: Sequence[str],
               notes: list[str]) -> str | None:
    if name and name.strip().lower() == "demo":
        return "demo"
    entry, how = _find(name or "", (wanted_hash or "").lower() or None, library.checkpoints)
    if entry is not None:
        if how == "hash":
            notes.append(f"checkpoint {name!r} found by its hash as {entry.path}.")
        return str(entry.path)
    where = f"in {', '.join(map(str, model_dirs))}" if model_dirs else "(no --model-dir given)"
    notes.append(f"checkpoint {name!r}" + (f" (hash {wanted_hash})" if wanted_hash else "") + f" not found {where}.")
    return None
