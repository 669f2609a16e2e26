"""What the ecosystem keeps beside a LoRA ``name.safetensors``: a preview image, Civitai-Helper's
``name.civitai.info``, A1111's ``name.json`` and ComfyUI-Lora-Manager's ``name.metadata.json``.

Every reader is lenient: a sidecar that is missing, unreadable or of the wrong shape gives nothing, never an
error (the LoRA itself is still listed)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# the order A1111 and the helpers look in: "name.preview.png" first, then "name.png" ...
PREVIEW_STEMS = (".preview", "")
MAX_SIDECAR_BYTES = 4 * 1024 * 1024


@dataclass
class Sidecars:
    preview: Path | None = None
    trigger_words: list[str] = field(default_factory=list)
    activation_text: str | None = None
    preferred_weight: float | None = None
    sd_version: str | None = None
    description: str | None = None
    civitai: dict[str, str | None] | None = None     # model_name, version_name, base_model
    model_name: str | None = None                    # Lora-Manager's name for it


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _words(value: Any) -> list[str]:
    """Trigger words from a list of strings (each may hold several, comma separated, as Civitai stores them)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [w.strip() for v in value if isinstance(v, str) for w in v.split(",") if w.strip()]


def _number(value: Any) -> float | None:
    """A1111's "preferred weight"; 0 (what its editor writes when left alone) means none."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value == 0:
        return None
    return float(value)


def find_preview(lora: Path, names: set[str]) -> Path | None:
    """The preview image beside ``lora`` whose name is in ``names`` (the folder's file names, listed once)."""
    stem = lora.name[: -len(lora.suffix)] if lora.suffix else lora.name
    for middle in PREVIEW_STEMS:
        for suffix in PREVIEW_SUFFIXES:
            for candidate in (f"{stem}{middle}{suffix}", f"{stem}{middle}{suffix.upper()}"):
                if candidate in names:
                    return lora.with_name(candidate)
    return None


def read_sidecars(lora: Path, names: set[str]) -> Sidecars:
    """Everything the sidecars of ``lora`` say. ``names`` is the set of file names in its folder, so that a
    library of hundreds of LoRAs costs one listing per folder, not a dozen look-ups per file."""
    stem = lora.name[: -len(lora.suffix)] if lora.suffix else lora.name
    out = Sidecars(preview=find_preview(lora, names))

    info = _read_json(lora.with_name(f"{stem}.civitai.info")) if f"{stem}.civitai.info" in names else None
    if info is not None:
        model = info.get("model") if isinstance(info.get("model"), dict) else {}
        out.civitai = {"model_name": _text(model.get("name")), "version_name": _text(info.get("name")),
                       "base_model": _text(info.get("baseModel"))}
        out.trigger_words += _words(info.get("trainedWords"))

    user = _read_json(lora.with_name(f"{stem}.json")) if f"{stem}.json" in names else None
    if user is not None:
        out.activation_text = _text(user.get("activation text"))
        out.preferred_weight = _number(user.get("preferred weight"))
        out.sd_version = _text(user.get("sd version"))
        out.description = _text(user.get("description"))

    manager = _read_json(lora.with_name(f"{stem}.metadata.json")) if f"{stem}.metadata.json" in names else None
    if manager is not None:
        out.model_name = _text(manager.get("model_name"))
        civitai = manager.get("civitai") if isinstance(manager.get("civitai"), dict) else {}
        out.trigger_words += _words(civitai.get("trainedWords")) + _words(manager.get("trainedWords"))
        if out.civitai is None and civitai:
            model = civitai.get("model") if isinstance(civitai.get("model"), dict) else {}
            out.civitai = {"model_name": _text(model.get("name")), "version_name": _text(civitai.get("name")),
                           "base_model": _text(civitai.get("baseModel")) or _text(manager.get("base_model"))}
        url = _text(manager.get("preview_url"))
        if out.preview is None and url and "://" not in url:
            local = Path(url).expanduser()
            local = local if local.is_absolute() else lora.parent / local
            if local.is_file():
                out.preview = local
    return out
