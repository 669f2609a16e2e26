"""Side-by-side comparisons: base vs each LoRA vs the mix, and X/Y grids (A1111's X/Y/Z plot idea).

Every cell uses the same prompt and seed unless an axis changes them. Between cells only strengths change,
through ``LoraMixer.set_strength`` + ``apply`` on weights already in memory: no LoRA file is read again and
the model is never reloaded. The base weights are restored at the end (also on error or stop); the entries'
own strengths (the user's) are never changed: cells render through ``LoraMixer.apply(strengths)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, StopRequested
from ..grid import labelled_grid
from ..progress import ProgressCallback, StopFlag, report
from ..render import (GenParams, canonical_sampler, hashes_field, infotext, lora_hash, record, render,
                     save_image_with_parameters, save_png)

Strengths = dict[str, tuple[float, float]]   # entry name -> (unet strength, text-encoder strength)


@dataclass
class ComparisonResult:
    grid_path: Path
    image_paths: list[Path]
    labels: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "x"


def _fmt(x: float) -> str:
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


class _MixState:
    """Renders cells at their own strengths through ``LoraMixer.apply(strengths)`` (the entries' strengths, the
    user's, are never changed), applying only when the strengths change, and restores W0 on exit."""

    def __init__(self, mixer) -> None:
        self.mixer = mixer
        self.applied: Strengths | None = None   # the strengths the pipeline weights show

    def effective(self) -> Strengths:
        """Every entry's own (unet, te) strengths."""
        return {e.name: (e.strength, e.effective_te_strength) for e in self.mixer.entries}

    def set(self, strengths: Strengths) -> None:
        """Make the pipeline weights W0 + sum of strengths * deltas; all-zero means the exact base weights."""
        if strengths == self.applied:
            return
        if all(u == 0 and t == 0 for u, t in strengths.values()):
            self.mixer.restore()
        else:
            self.mixer.apply(strengths)
        self.applied = dict(strengths)

    def __enter__(self) -> "_MixState":
        return self

    def __exit__(self, *exc) -> None:
        self.mixer.restore()


def _entry_names(mixer, loras: Sequence[Sequence]) -> list[tuple[str, float, float]]:
    """``(entry name, strength[, te_strength])`` of LoRAs already in the mixer, checked; files are never read
    here (the session, or the caller, put them in the mixer)."""
    known = {e.name for e in mixer.entries}
    out = []
    for item in loras:
        name, strength = str(item[0]), float(item[1])
        te = float(item[2]) if len(item) > 2 and item[2] is not None else strength
        if name not in known:
            raise ConfigError(f"LoRA {name!r} is not in the mix; the mix holds: {', '.join(sorted(known)) or 'nothing'}.")
        out.append((name, strength, te))
    return out


def _check_stop(stop: StopFlag | None, done: int) -> None:
    if stop is not None and stop.requested:
        raise StopRequested(f"stopped after {done} image(s); those are saved.")


def mixer_hashes(mixer) -> dict[str, str]:
    """A1111 short hashes of the mix's LoRA files (reads each file once; pass the result as ``lora_hashes``)."""
    return {e.name: lora_hash(e.path) for e in mixer.entries if getattr(e, "path", None) and Path(e.path).is_file()}


def comparison_grid(pipe, mixer, params: GenParams, loras: Sequence[Sequence], out_dir: str | Path, *,
                    scale: int = 2, prefix: str = "compare",
                    lora_hashes: dict[str, str] | None = None,
                    progress: ProgressCallback | None = None, stop: StopFlag | None = None) -> ComparisonResult:
    """One row, same prompt and seed: the base model alone, each LoRA alone at its strength, then all of them
    together. Every tile is saved as a PNG with its parameters; the grid PNG carries the mix's parameters.
    ``lora_hashes`` (see ``mixer_hashes``) adds A1111's "Lora hashes" field."""
    out_dir = Path(out_dir)
    picked = _entry_names(mixer, loras)
    if not picked:
        raise ConfigError("a comparison needs at least one LoRA. Add one with --lora FILE:STRENGTH.")
    params = params.check()
    with _MixState(mixer) as state:
        zero = {e.name: (0.0, 0.0) for e in mixer.entries}
        cells: list[tuple[str, Strengths, list]] = [("base", zero, [])]
        for name, s, t in picked:
            cells.append((f"{name} {_fmt(s)}", {**zero, name: (s, t)}, [(name, s, t)]))
        if len(picked) > 1:
            cells.append(("mix", {**zero, **{n: (s, t) for n, s, t in picked}}, picked))
        images, paths = [], []
        for i, (label, strengths, tags) in enumerate(cells):
            _check_stop(stop, i)
            state.set(strengths)
            rendered = render(pipe, params, tags, lora_hashes=lora_hashes)
            images.append(rendered.image)
            paths.append(save_png(rendered, out_dir / f"{prefix}-{i:02d}-{_slug(label)}.png"))
            report(progress, "compare", i + 1, len(cells), label)
    grid = labelled_grid([images], [c[0] for c in cells], scale=scale)
    extra = hashes_field(picked, lora_hashes)
    grid_path = save_image_with_parameters(grid, out_dir / f"{prefix}-grid.png", infotext(params, picked, extra),
                                           {**record(params, picked, extra), "cells": [str(p.name) for p in paths]})
    return ComparisonResult(grid_path, paths, [c[0] for c in cells])


# --------------------------------------------------------------------------- X/Y grids
AXIS_KINDS = ("strength", "te_strength", "lora", "seed", "steps", "cfg", "sampler", "prompt")


@dataclass
class Axis:
    """One grid axis. ``kind`` is one of ``AXIS_KINDS``:

    - ``strength`` / ``te_strength``: values are strengths; they go to ``lora`` when it is set, otherwise to
      every LoRA active in the cell;
    - ``lora``: values are mixer entry names; in each cell only that LoRA is active (``"none"`` = base);
    - ``seed`` / ``steps`` / ``cfg`` / ``sampler``: the generation setting;
    - ``prompt``: A1111's Prompt S/R: the first value must occur in the prompt, each cell replaces it.
    """

    kind: str
    values: list[Any]
    lora: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in AXIS_KINDS:
            raise ConfigError(f"unknown grid axis {self.kind!r}. Choose one of: {', '.join(AXIS_KINDS)}.")
        if self.lora is not None and self.kind not in ("strength", "te_strength"):
            raise ConfigError(f"grid axis {self.kind}:{self.lora}: only strength and te_strength axes take a "
                              "LoRA name after a colon.")
        if not self.values:
            raise ConfigError(f"grid axis {self.kind!r} has no values. Give at least one, e.g. {self.kind}=0,0.5,1.")
        convert = {"strength": float, "te_strength": float, "seed": int, "steps": int, "cfg": float,
                   "sampler": canonical_sampler}.get(self.kind, str)
        try:
            self.values = [convert(v) for v in self.values]
        except ValueError as err:
            raise ConfigError(f"grid axis {self.kind!r}: {err}. Give values like {self.kind}=1,2,3.") from err

    @property
    def title(self) -> str:
        names = {"strength": "Strength", "te_strength": "TE strength", "lora": "LoRA", "seed": "Seed",
                 "steps": "Steps", "cfg": "CFG scale", "sampler": "Sampler", "prompt": "Prompt S/R"}
        return names[self.kind] + (f" ({self.lora})" if self.lora else "")

    def label(self, value: Any) -> str:
        if self.kind in ("strength", "te_strength", "cfg"):
            return f"{self.title}: {_fmt(value)}"
        if self.kind == "lora":
            return "base" if str(value).lower() in ("none", "base") else str(value)
        if self.kind == "prompt":
            return str(value)
        return f"{self.title}: {value}"


def parse_axis(text: str) -> Axis:
    """``"strength=0,0.5,1"``, ``"strength:NAME=0,1"`` (one LoRA), ``"seed=1,2,3"``, ``"lora=a,b"``,
    ``"prompt=red,blue"`` (Prompt S/R), ``"sampler=DDIM,Euler a"``."""
    head, sep, tail = text.partition("=")
    if not sep:
        raise ConfigError(f"grid axis {text!r} should look like KIND=V1,V2 (e.g. strength=0,0.5,1); "
                          f"kinds: {', '.join(AXIS_KINDS)}.")
    kind, _, lora = head.strip().partition(":")
    return Axis(kind.strip().lower(), [v.strip() for v in tail.split(",") if v.strip()], lora.strip() or None)


@dataclass
class _Cell:
    params: GenParams
    strengths: Strengths          # every entry's (unet, te) before the active filter
    active: set[str]              # the entries switched on in this cell

    def final(self) -> Strengths:
        return {n: (v if n in self.active else (0.0, 0.0)) for n, v in self.strengths.items()}


def _step(cell: _Cell, axis: Axis, value: Any) -> _Cell:
    """The cell after one axis has set its value."""
    if axis.kind in ("seed", "steps", "cfg", "sampler"):
        return replace(cell, params=replace(cell.params, **{axis.kind: value}))
    if axis.kind == "prompt":
        return replace(cell, params=replace(cell.params, prompt=cell.params.prompt.replace(axis.values[0], value)))
    strengths = dict(cell.strengths)
    if axis.kind == "lora":
        if value.lower() in ("none", "base"):
            return replace(cell, active=set())
        if strengths[value] == (0.0, 0.0):   # shown alone at 0 would just be the base picture
            strengths[value] = (1.0, 1.0)
        return replace(cell, strengths=strengths, active={value})
    targets = {axis.lora} if axis.lora else set(cell.active)
    for n in targets:
        u, t = strengths[n]
        strengths[n] = (value, value if t == u else t) if axis.kind == "strength" else (u, value)
    return replace(cell, strengths=strengths, active=cell.active | targets)


def _check_axis(axis: Axis, params: GenParams, names: set[str]) -> None:
    if axis.lora and axis.lora not in names:
        raise ConfigError(f"grid axis {axis.kind}:{axis.lora} names a LoRA that is not in the mix. "
                          f"In the mix: {', '.join(sorted(names)) or 'nothing'}.")
    if axis.kind == "lora":
        for v in axis.values:
            if v not in names and v.lower() not in ("none", "base"):
                raise ConfigError(f"grid axis lora={v!r}: no such LoRA in the mix. In the mix: "
                                  f"{', '.join(sorted(names)) or 'nothing'} (or 'none' for the base model).")
    if axis.kind == "prompt" and axis.values[0] not in params.prompt:
        raise ConfigError(f"Prompt S/R: the first value {axis.values[0]!r} must occur in the prompt "
                          f"{params.prompt!r}; it is the text each cell replaces.")
    if axis.kind in ("strength", "te_strength", "lora") and not names:
        raise ConfigError(f"grid axis {axis.kind!r} needs at least one LoRA in the mix. Add one with --lora.")


def xy_grid(pipe, mixer, params: GenParams, x: Axis, y: Axis | None, out_dir: str | Path, *,
            scale: int = 2, prefix: str = "xy", lora_hashes: dict[str, str] | None = None,
            progress: ProgressCallback | None = None,
            stop: StopFlag | None = None) -> ComparisonResult:
    """Render every (y, x) combination. The starting point of each cell is the mixer's current strengths;
    axes then change settings or strengths. Cells go to ``out_dir/<prefix>-cells``; the grid to
    ``out_dir/<prefix>-grid.png`` with A1111's "X Type/X Values" fields in its parameters."""
    out_dir = Path(out_dir)
    params = params.check()
    rows = y or Axis("seed", [params.seed])
    names = {e.name for e in mixer.entries}
    for axis in (x, y):
        if axis is not None:
            _check_axis(axis, params, names)
    with _MixState(mixer) as state:
        start = state.effective()
        on = {n for n, v in start.items() if v != (0.0, 0.0)}
        first = _Cell(params, start, on or set(names))   # nothing on yet: strength axes speak for every LoRA
        plan = []   # (row, col, cell, label): built and checked before the first (slow) render
        for r, yv in enumerate(rows.values):
            row_cell = _step(first, rows, yv) if y is not None else first
            for c, xv in enumerate(x.values):
                cell = _step(row_cell, x, xv)
                try:
                    cell.params = cell.params.check()
                except ConfigError as err:
                    raise ConfigError(f"grid cell {x.label(xv)}" + (f" / {rows.label(yv)}" if y else "")
                                      + f": {err}") from None
                plan.append((r, c, cell, x.label(xv) + (f" / {rows.label(yv)}" if y else "")))
        images: list[list] = [[] for _ in rows.values]
        paths = []
        for r, c, cell, label in plan:
            _check_stop(stop, len(paths))
            strengths = cell.final()
            state.set(strengths)
            tags = [(n, u, t) for n, (u, t) in sorted(strengths.items()) if (u, t) != (0.0, 0.0)]
            rendered = render(pipe, cell.params, tags, lora_hashes=lora_hashes)
            images[r].append(rendered.image)
            paths.append(save_png(rendered, out_dir / f"{prefix}-cells" / f"{prefix}-{r:02d}-{c:02d}.png"))
            report(progress, "xy-grid", len(paths), len(plan), label)
    grid = labelled_grid(images, [x.label(v) for v in x.values], [rows.label(v) for v in rows.values] if y else [],
                         scale=scale)
    extra = {"X Type": x.title, "X Values": ", ".join(map(str, x.values))}
    if y is not None:
        extra.update({"Y Type": y.title, "Y Values": ", ".join(map(str, y.values))})
    start_tags = [(n, u, t) for n, (u, t) in sorted(start.items()) if (u, t) != (0.0, 0.0)]
    extra.update(hashes_field(start_tags, lora_hashes))
    grid_path = save_image_with_parameters(grid, out_dir / f"{prefix}-grid.png", infotext(params, start_tags, extra),
                                           {**record(params, start_tags, extra),
                                            "cells": [str(p.relative_to(out_dir)) for p in paths]})
    return ComparisonResult(grid_path, paths, [label for *_, label in plan])
