"""Spectrum view: singular values and cumulative energy per module, with the suggested rank marked.

This is what tells a user which rank to train with next time: if 90% of the energy of most modules sits in the
first 6 singular values, rank 8 is plenty. Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .fileio import atomic_path
from .lora.formats import LoraModule
from .lora.rank import energy_curve, module_spectrum, rank_for_energy_summary, singular_values

MAX_LABELLED = 8  # modules named in the legend; beyond that the curves are drawn thin and unlabelled


@dataclass
class SpectrumSummary:
    energy: float
    modules: int
    rank_most: int        # the rank that keeps `energy` for 90% of the modules
    rank_max: int         # the rank the most demanding module needs
    rank_median: int
    per_module: dict[str, int]

    def text(self) -> str:
        if not self.modules:
            return "no modules to analyse."
        pct = f"{self.energy * 100:g}%"
        return (f"to keep {pct} energy most modules (90% of {self.modules}) need rank <= {self.rank_most}; "
                f"median {self.rank_median}, the most demanding module needs {self.rank_max}.")


def to_spectra(items: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Accept per-module singular values (1-D tensors), deltas (2-D/4-D tensors), LoraModules or anything with
    a ``singular_values`` attribute (a ``ResizeStat``); return descending fp32 spectra."""
    out: dict[str, torch.Tensor] = {}
    for name, item in items.items():
        sv = getattr(item, "singular_values", None)
        if isinstance(sv, torch.Tensor):
            out[name] = sv.detach().float()
        elif isinstance(item, LoraModule):
            out[name] = module_spectrum(item)
        elif isinstance(item, torch.Tensor) and item.dim() == 1:
            out[name] = item.detach().float().sort(descending=True).values
        elif isinstance(item, torch.Tensor):
            out[name] = singular_values(item)
        else:
            raise TypeError(f"cannot take a spectrum of {name}: {type(item).__name__}")
    return out


def summarize_spectra(spectra: Mapping[str, torch.Tensor], energy: float = 0.9) -> SpectrumSummary:
    most, largest, per = rank_for_energy_summary(spectra, energy)
    ordered = sorted(per.values())
    median = ordered[(len(ordered) - 1) // 2] if ordered else 0
    return SpectrumSummary(energy, len(per), most, largest, median, per)


def plot_spectrum(modules_or_deltas: Mapping[str, object], out_png: str | os.PathLike,
                  suggested: Mapping[str, int] | None = None, energy: float = 0.9,
                  title: str = "") -> SpectrumSummary:
    """Write a PNG with three panels and return the summary the CLI prints.

    Left: singular values (normalised to each module's largest, log scale), one curve per module.
    Middle: cumulative energy against rank, the ``energy`` threshold as a dashed line, each module's ``suggested``
    rank (default: the rank keeping ``energy``) as a dot on its curve, and the rank that covers most modules as a
    vertical line. Right: a histogram of the per-module suggested ranks.
    """
    # A bare Figure renders through Agg with no pyplot state: no display, no global backend switch, thread-safe.
    from matplotlib.figure import Figure

    spectra = to_spectra(modules_or_deltas)
    summary = summarize_spectra(spectra, energy)
    marks = dict(summary.per_module)
    marks.update({k: int(v) for k, v in (suggested or {}).items() if k in spectra})

    fig = Figure(figsize=(14, 4.4), dpi=100)
    ax_s, ax_e, ax_h = fig.subplots(1, 3)
    labelled = len(spectra) <= MAX_LABELLED
    width = 1.4 if labelled else 0.7
    alpha = 0.9 if labelled else max(0.15, min(0.6, 20 / max(len(spectra), 1)))
    for name, s in spectra.items():
        k = torch.arange(1, s.numel() + 1).numpy()
        s_max = float(s.max()) if s.numel() else 0.0
        norm = (s / s_max).clamp_min(1e-12).numpy() if s_max > 0 else torch.ones_like(s).numpy()
        label = _short(name) if labelled else None
        (line,) = ax_s.plot(k, norm, lw=width, alpha=alpha, label=label)
        curve = energy_curve(s).numpy()
        ax_e.plot(k, curve, lw=width, alpha=alpha, color=line.get_color())
        r = marks.get(name)
        if r is not None and 1 <= r <= s.numel():
            ax_e.plot([r], [curve[r - 1]], "o", ms=4, color=line.get_color())
    ax_s.set_yscale("log")
    ax_s.set_xlabel("index")
    ax_s.set_ylabel("singular value / largest")
    ax_s.set_title("singular values")
    if labelled and spectra:
        ax_s.legend(fontsize=7, loc="lower left")
    ax_e.axhline(energy, ls="--", color="gray", lw=1)
    if summary.modules:
        ax_e.axvline(summary.rank_most, color="crimson", lw=1.2,
                     label=f"rank {summary.rank_most} keeps {energy * 100:g}% for 90% of modules")
        ax_e.legend(fontsize=8, loc="lower right")
    ax_e.set_xscale("log")
    ax_e.set_ylim(0, 1.02)
    ax_e.set_xlabel("rank")
    ax_e.set_ylabel("cumulative energy")
    ax_e.set_title("energy kept by rank")
    ranks = list(marks.values())
    if ranks:
        top = max(ranks)
        bins = [b - 0.5 for b in range(1, top + 2)] if top <= 64 else 32  # one bar per rank when few
        ax_h.hist(ranks, bins=bins, color="steelblue")
        ax_h.axvline(summary.rank_most, color="crimson", lw=1.2)
    ax_h.set_xlabel(f"rank for {energy * 100:g}% energy")
    ax_h.set_ylabel("modules")
    ax_h.set_title("suggested rank per module")
    fig.suptitle(title or f"{summary.modules} modules: {summary.text()}", fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return summary


def _short(name: str, width: int = 48) -> str:
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name if len(name) <= width else "..." + name[-(width - 3):]
