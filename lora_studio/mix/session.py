"""One user's live mix: a base pipeline and a ``LoraMixer`` kept in memory between renders.

A GUI session moves a slider and renders again many times. ``MixSession`` loads the base model once per base
(``loads`` counts it), reads each LoRA file once (``reads`` counts it) and afterwards only re-weights through
``LoraMixer.set_strength`` + ``apply``: a changed strength costs no file read and no model load. A LoRA taken
out of the slots is removed from the mixer; a different base starts a fresh pipeline and mixer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .compare import ComparisonResult, comparison_grid, parse_axis, xy_grid
from ..errors import ConfigError
from ..models import load_base
from ..progress import ProgressCallback, StopFlag
from ..render import GenParams


@dataclass
class SlotSpec:
    """One LoRA in the mix as the user set it: a file, its strength, an optional text-encoder strength
    (None: same as ``strength``) and per-block weights (``LoraMixer`` keys: down, mid, up, down.0, ...)."""

    path: str
    strength: float = 1.0
    te_strength: float | None = None
    blocks: dict[str, float] = field(default_factory=dict)


def _default_loader(base: str):
    return load_base(base).pipe


class MixSession:
    """See the module docstring. Methods are serialised by a lock: one session renders one thing at a time."""

    def __init__(self, loader: Callable[[str], Any] | None = None) -> None:
        self._loader = loader or _default_loader
        self._lock = threading.RLock()
        self.base: str | None = None
        self.pipe: Any = None
        self.mixer: Any = None
        self.loads = 0                      # base models loaded so far
        self.reads = 0                      # LoRA files read so far
        self._names: dict[str, str] = {}    # resolved file path -> mixer entry name

    def use_base(self, base: str):
        """The pipeline for ``base``, loaded only when the base differs from the one in memory."""
        from .mixer import LoraMixer

        base = (base or "demo").strip()
        with self._lock:
            if self.pipe is None or base != self.base:
                self.pipe, self.mixer, self.base, self._names = None, None, None, {}
                pipe = self._loader(base)
                self.loads += 1
                self.pipe, self.mixer, self.base = pipe, LoraMixer(pipe), base
            return self.pipe

    def set_loras(self, base: str, slots: Sequence[SlotSpec]) -> list[tuple[str, float, float]]:
        """Make the mixer hold exactly ``slots`` (reading only files it does not hold yet); returns the
        ``(entry name, strength, te strength)`` of each slot, in order."""
        with self._lock:
            self.use_base(base)
            wanted: dict[str, SlotSpec] = {}
            for slot in slots:
                key = str(Path(slot.path).resolve())
                if key in wanted:
                    raise ConfigError(f"{Path(slot.path).name} is in the mix twice; use one slot per LoRA.")
                wanted[key] = slot
            for key in [k for k in self._names if k not in wanted]:
                self.mixer.remove(self._names.pop(key))
            picked = []
            for key, slot in wanted.items():
                if key not in self._names:
                    self._names[key] = self.mixer.add(slot.path, strength=slot.strength, te_strength=slot.te_strength,
                                                      block_weights=slot.blocks)
                    self.reads += 1
                else:
                    self.mixer.set_strength(self._names[key], unet=slot.strength, te=slot.te_strength,
                                            blocks=slot.blocks, te_follows_unet=slot.te_strength is None)
                te = slot.strength if slot.te_strength is None else slot.te_strength
                picked.append((self._names[key], float(slot.strength), float(te)))
            return picked

    def compare(self, base: str, slots: Sequence[SlotSpec], params: GenParams, out_dir: str | Path, *,
                prefix: str = "compare", progress: ProgressCallback | None = None,
                stop: StopFlag | None = None) -> ComparisonResult:
        """The base / each LoRA / mix comparison row (``compare.comparison_grid``) for the slots as set now."""
        with self._lock:
            picked = self.set_loras(base, slots)
            if not picked:
                raise ConfigError("the mix is empty: pick at least one LoRA in a slot, then render.")
            return comparison_grid(self.pipe, self.mixer, params, picked, out_dir, prefix=prefix,
                                   progress=progress, stop=stop)

    def xy(self, base: str, slots: Sequence[SlotSpec], params: GenParams, x: str, y: str, out_dir: str | Path, *,
           prefix: str = "xy", progress: ProgressCallback | None = None,
           stop: StopFlag | None = None) -> ComparisonResult:
        """An X/Y grid (``compare.xy_grid``); ``x``/``y`` are axis texts like ``"strength=0,0.5,1"``."""
        if not (x or "").strip():
            raise ConfigError("the X axis is empty; give e.g. strength=0,0.5,1 or seed=1,2,3.")
        x_axis = parse_axis(x)
        y_axis = parse_axis(y) if (y or "").strip() else None
        with self._lock:
            self.set_loras(base, slots)
            return xy_grid(self.pipe, self.mixer, params, x_axis, y_axis, out_dir, prefix=prefix,
                           progress=progress, stop=stop)

    def report(self) -> str:
        with self._lock:
            return self.mixer.report() if self.mixer is not None else "No base model loaded yet."
