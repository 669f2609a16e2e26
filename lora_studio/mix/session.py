"""One user's live mix: a base pipeline and a ``LoraMixer`` kept in memory between renders. The CLI and the app
both talk to a ``MixSession`` (the CLI's lives for one command) and hand it ``SlotSpec``s, what the user set.

A GUI session moves a slider and renders again many times. ``MixSession`` loads the base model once per base
(``loads`` counts it), reads each LoRA file once (``reads`` counts it) and afterwards only re-weights through
``LoraMixer.set_strength`` + ``apply``: a changed strength costs no file read and no model load. A LoRA taken
out of the slots is removed from the mixer; a different base starts a fresh pipeline and mixer.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError
from ..fileio import file_sha256
from ..library.cache import autov2
from ..models import load_base
from ..progress import ProgressCallback, StopFlag
from ..render import GenParams, RenderedImage, lora_hash, render
from .args import SlotSpec
from .compare import Axis, ComparisonResult, comparison_grid, parse_axis, xy_grid
from .mixer import LoraMixer
from .presets import MixPreset, preset_from_mixer


def _default_loader(base: str):
    return load_base(base).pipe


def model_name(base: str) -> str:
    """The model's name in the infotext: "demo", or the file or folder name."""
    return "demo" if base.strip().lower() == "demo" else (Path(base).stem or base)


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
        self._digests: dict[tuple[str, str, int, int], str] = {}  # (kind, path, size, mtime) -> hash, see _once

    def use_base(self, base: str):
        """The pipeline for ``base``, loaded only when the base differs from the one in memory."""
        base = (base or "demo").strip()
        with self._lock:
            if self.pipe is None or base != self.base:
                self.pipe, self.mixer, self.base, self._names = None, None, None, {}
                pipe = self._loader(base)
                self.loads += 1
                self.pipe, self.mixer, self.base = pipe, LoraMixer(pipe), base
            return self.pipe

    def set_loras(self, base: str, slots: Sequence[SlotSpec], allow_partial: bool = False
                  ) -> list[tuple[str, float, float]]:
        """Make the mixer hold exactly ``slots`` (reading only files it does not hold yet); returns the
        ``(entry name, strength, te strength)`` of each slot, in order. ``allow_partial``: see ``LoraMixer.add``."""
        with self._lock:
            self.use_base(base)
            wanted: dict[str, SlotSpec] = {}
            for slot in slots:
                key = str(Path(slot.path).resolve())
                if key in wanted:
                    raise ConfigError(f"{Path(slot.path).name} is asked for twice (in the mix twice); give each LoRA "
                                      "once, in one slot.")
                wanted[key] = slot
            for key in [k for k in self._names if k not in wanted]:
                self.mixer.remove(self._names.pop(key))
            picked = []
            for key, slot in wanted.items():
                if key not in self._names:
                    self._names[key] = self.mixer.add(slot.path, name=slot.name, strength=slot.strength,
                                                      te_strength=slot.te_strength, block_weights=slot.blocks,
                                                      allow_partial=allow_partial)
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
            if not self.set_loras(base, slots):
                raise ConfigError("the mix is empty: pick at least one LoRA in a slot, then render.")
            entries = [(e.name, e.strength, e.effective_te_strength) for e in self.mixer.entries]
            return comparison_grid(self.pipe, self.mixer, self._stamped(params), entries, out_dir, prefix=prefix,
                                   lora_hashes=self.hashes(), progress=progress, stop=stop)

    def xy(self, base: str, slots: Sequence[SlotSpec], params: GenParams, x: str | Axis, y: str | Axis | None,
           out_dir: str | Path, *, prefix: str = "xy", progress: ProgressCallback | None = None,
           stop: StopFlag | None = None) -> ComparisonResult:
        """An X/Y grid (``compare.xy_grid``); ``x``/``y`` are axes or their texts, like ``"strength=0,0.5,1"``."""
        if isinstance(x, str) and not x.strip():
            raise ConfigError("the X axis is empty; give e.g. strength=0,0.5,1 or seed=1,2,3.")
        x_axis = parse_axis(x) if isinstance(x, str) else x
        y_axis = parse_axis(y) if isinstance(y, str) and y.strip() else (y if isinstance(y, Axis) else None)
        with self._lock:
            self.set_loras(base, slots)
            return xy_grid(self.pipe, self.mixer, self._stamped(params), x_axis, y_axis, out_dir, prefix=prefix,
                           lora_hashes=self.hashes(), progress=progress, stop=stop)

    def render(self, params: GenParams, progress: ProgressCallback | None = None) -> RenderedImage:
        """One image of the mix as set (``set_loras`` first), with its LoRAs and their hashes in the infotext;
        the base weights are restored afterwards."""
        with self._lock:
            if self.mixer is None:
                raise ConfigError("no base model loaded yet: set the LoRAs (and the base) first.")
            loras = [(e.name, e.strength, e.te_strength) for e in self.mixer.entries]
            hashes = self.hashes()
            self.mixer.apply()
            try:
                return render(self.pipe, self._stamped(params), loras, progress=progress, lora_hashes=hashes)
            finally:
                self.mixer.restore()

    def model_hash(self) -> str:
        """A1111's "Model hash" of the base in memory: the AutoV2 of its checkpoint file, hashed once per file
        (kept while its size and modification time stay the same); "" for the demo model, a diffusers folder
        or a hub id, which have no single file to hash."""
        if not self.base or not Path(self.base).is_file():
            return ""
        return self._once("autov2", self.base, lambda p: autov2(file_sha256(p)) or "")

    def _stamped(self, params: GenParams) -> GenParams:
        return replace(params, model_hash=self.model_hash())

    def hashes(self) -> dict[str, str]:
        """A1111 short hashes of the mix's files ("Lora hashes" in the infotext), each file hashed once."""
        out = {}
        for e in self.mixer.entries:
            if e.path is None or not Path(e.path).is_file():
                continue
            out[e.name] = self._once("lora", e.path, lora_hash)
        return out

    def _once(self, kind: str, path: str | Path, digest: Callable[[str | Path], str]) -> str:
        """``digest(path)``, computed once while the file keeps its size and modification time."""
        st = Path(path).stat()
        key = (kind, str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = digest(path)
        return self._digests[key]

    def to_preset(self, params: GenParams, lora_dir: str | None = None) -> MixPreset:
        """The mix as set, with ``params``, as a mixing preset (``presets.save_mix_preset`` writes it)."""
        with self._lock:
            return preset_from_mixer(self.mixer, params, self.base or "demo", lora_dir)

    def report(self) -> str:
        with self._lock:
            return self.mixer.report() if self.mixer is not None else "No base model loaded yet."
