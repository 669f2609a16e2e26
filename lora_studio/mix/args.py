"""What users type and set for a LoRA: ``SlotSpec`` (a LoRA in the mix as the user set it) and the one reader of
``FILE[:STRENGTH[:TE_STRENGTH]]`` (CLI ``--lora``, the export
tab's lines, preset strings) and block weights (``down=1, mid=0.5, up.1=0``; the CLI's ``NAME:KEY=W,...``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError, InputFileError
from ..library import LORA_SUFFIXES, PICKLE_SUFFIXES, resolve

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


class LoraArg(NamedTuple):
    """A LoRA as typed: a file (or a name to look up), its strength, and its text-encoder strength (None: the
    text encoder follows ``strength``)."""

    ref: str
    strength: float = 1.0
    te_strength: float | None = None


@dataclass
class SlotSpec:
    """One LoRA in the mix as the user set it: a file, its strength, an optional text-encoder strength
    (None: same as ``strength``) and per-block weights (``LoraMixer`` keys: down, mid, up, down.0, ...)."""

    path: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: dict[str, float] = field(default_factory=dict)
    name: str | None = None            # the name in the mix (default: the file's stem)

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


def apply_blocks_args(slots: list[SlotSpec], blocks: list[tuple[str, dict[str, float]]]) -> None:
    """Give each ``--blocks NAME:...`` to the slot of that name (its ``label``)."""
    by_label = {s.label: s for s in slots}
    for name, weights in blocks:
        if name not in by_label:
            raise ConfigError(f"--blocks {name}:... names no LoRA of the mix; the mix holds: "
                              f"{', '.join(by_label) or 'nothing'}.")
        by_label[name].blocks = dict(weights)


def parse_lora_arg(text: str) -> LoraArg:
    """``"a.safetensors:0.8"`` -> ("a.safetensors", 0.8, None); ``"a:0.8:0.5"`` -> te 0.5. A path may hold
    colons (``C:\\x.safetensors``): only trailing numbers are strengths, and a trailing word that is no path
    (``a.safetensors:abc``, ``:nan``) is a strength that is not a number."""
    text = text.strip()
    m = re.fullmatch(rf"(.+?)(?::({_NUM}))?(?::({_NUM}))?", text)
    if not m or not m.group(1):
        raise ConfigError(f"--lora {text!r}: write FILE, FILE:STRENGTH or FILE:STRENGTH:TE_STRENGTH.")
    ref, s, te = m.group(1), m.group(2), m.group(3)
    head, sep, tail = ref.rpartition(":")
    if sep and head and not Path(ref).exists() and not re.search(r"[\\/]", tail):
        raise ConfigError(f"--lora {text!r}: the strength {tail!r} is not a number. "
                          "Write FILE:STRENGTH with a finite number, e.g. a.safetensors:0.8 or a.safetensors:-0.5.")
    return LoraArg(ref, float(s) if s is not None else 1.0, float(te) if te is not None else None)


def parse_block_weights(text: str) -> dict[str, float]:
    """``"down=1, mid=0.5, up.1=0"`` -> ``{"down": 1.0, "mid": 0.5, "up.1": 0.0}``; empty text -> ``{}``.
    The keys are checked by ``LoraMixer`` when the weights are set."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in (text or "").replace(";", ",").split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            number = float(value)
        except ValueError:
            raise ConfigError(f"block weight {part!r} should look like NAME=NUMBER, e.g. 'down=1, mid=0.5, "
                              "up.1=0'.") from None
        if not math.isfinite(number):
            raise ConfigError(f"block weight {part!r} is not a finite number.")
        out[key.strip()] = number
    return out


def parse_blocks_arg(text: str) -> tuple[str, dict[str, float]]:
    """``"stripes:down=0,up=0.5"`` -> ("stripes", {"down": 0.0, "up": 0.5}) (the CLI's ``--blocks``)."""
    name, sep, rest = text.rpartition(":")
    if not sep or not name:
        raise ConfigError(f"--blocks {text!r} names no LoRA: write NAME:KEY=WEIGHT,..., e.g. stripes:down=0,up=1.")
    try:
        weights = parse_block_weights(rest)
    except ConfigError:
        raise ConfigError(f"--blocks {text!r}: write NAME:KEY=WEIGHT,KEY=WEIGHT, e.g. stripes:down=0,up=1.") from None
    if not weights:
        raise ConfigError(f"--blocks {text!r}: write NAME:KEY=WEIGHT,KEY=WEIGHT, e.g. stripes:down=0,up=1.")
    return name, weights


def find_lora_arg(ref: str, lora_dir: str | None) -> Path:
    """The file a ``--lora`` reference names: an existing file, else a name looked up in ``lora_dir``."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise InputFileError(f"--lora {ref}: {path} is a folder, not a LoRA file. Name a .safetensors file, "
                             "or pass the folder as --lora-dir and the LoRA by name.")
    if path.suffix.lower() in (*LORA_SUFFIXES, *PICKLE_SUFFIXES) or len(path.parts) > 1:
        raise InputFileError(f"--lora {ref}: no such file: {path.resolve()}. Check the path.")
    if lora_dir is None:
        raise InputFileError(f"--lora {ref}: there is no file {path.resolve()}, and no --lora-dir to look the name "
                             "up in. Give the file's path, or pass --lora-dir FOLDER.")
    return resolve(ref, lora_dir)
