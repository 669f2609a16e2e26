"""Where the shipped presets are: the ``presets/`` folder of a clone, or the copy that ``pip install .`` puts
inside the package (``pyproject.toml`` maps that folder to ``lora_studio/presets``)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED, _CLONE = _PACKAGE / "presets", _PACKAGE.parent / "presets"

PRESETS_DIR = _INSTALLED if _INSTALLED.is_dir() else _CLONE
