"""How large a LoRA's change of a weight may be: at most ``MAX_DELTA_RATIO`` times the weight itself (Frobenius
norms). A delta as large as the weight already replaces the layer rather than adjusting it, so no working LoRA
comes near the limit, while a broken alpha (3e38) or a typo'd strength (1e7) does. ``OriginalSizes`` keeps what
the mixer measured of each W0, with as few host syncs as it can."""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..errors import ExportError
from ..lora.module import LoraModule

MAX_DELTA_RATIO = 1e4
FLOOR_ROWS = 16  # rows of W0 measured with every newly touched weight (see OriginalSizes.measure)
Key = tuple[str, str]          # (component, module name)


class OriginalSizes:
    """Per touched weight: the norm of W0's first rows (a lower bound of ||W0||_F), ||W0||_F when it was needed,
    and, for fp16 weights, the largest |W0| (the mixer's overflow bound)."""

    def __init__(self) -> None:
        self.floor: dict[Key, float] = {}
        self.norm: dict[Key, float] = {}
        self.absmax: dict[Key, float] = {}

    def clear(self) -> None:
        self.floor.clear()
        self.norm.clear()
        self.absmax.clear()

    def measure(self, originals: Mapping[Key, torch.Tensor]) -> None:
        """For newly touched weights, the norm of W0's first ``FLOOR_ROWS`` rows (a lower bound of ||W0||_F that
        settles the ratio check for any working LoRA without reading all of W0) and, for fp16, the largest |W0|;
        one host sync per device."""
        by_device: dict[torch.device, list] = {}
        for key, w0 in originals.items():
            stats = [torch.linalg.vector_norm(w0[:FLOOR_ROWS], dtype=torch.float32)]
            if w0.dtype == torch.float16:
                stats.append(w0.abs().max().float() if w0.numel() else torch.zeros((), device=w0.device))
            by_device.setdefault(w0.device, []).append((key, torch.stack(stats)))
        for items in by_device.values():
            values, at = torch.cat([t for _, t in items]).tolist(), 0
            for key, t in items:
                self.floor[key] = values[at]
                if len(t) > 1:
                    self.absmax[key] = values[at + 1]
                at += len(t)

    def within_limit(self, key: Key, w0: torch.Tensor, size: float) -> bool:
        """Whether a delta of Frobenius norm ``size`` may go on this weight: at most ``MAX_DELTA_RATIO`` times
        ||W0||_F (no limit for an all-zero W0). The full norm is read only when the floor does not settle it."""
        if size <= MAX_DELTA_RATIO * self.floor[key]:
            return True
        if key not in self.norm:
            self.norm[key] = float(torch.linalg.vector_norm(w0, dtype=torch.float32))
        norm = self.norm[key]
        return not math.isnan(size) and (norm == 0 or size <= MAX_DELTA_RATIO * norm)

    def too_large(self, key: Key, coeff: float, mod: LoraModule, size: float, source: str) -> ExportError:
        """The refusal of a LoRA whose change is past the limit (``within_limit`` measured the weight)."""
        layer, norm = f"{key[0]}.{key[1]}", self.norm[key]  # measured by within_limit
        if not math.isfinite(size):
            what = "gives NaN or inf (values out of float32's range)"
        else:
            what = (f"would change it by {size / norm:.3g} times the weight's own size (Frobenius norm {norm:.3g}; "
                    f"the limit is {MAX_DELTA_RATIO:g} times): that wrecks the model")
        alpha = f" (its alpha is {mod.alpha:g} for rank {mod.rank})" if mod.alpha is not None and mod.rank else ""
        return ExportError(f"LoRA {source} at strength {coeff:g} on {layer} (module {mod.name}) {what}"
                           f"{alpha}: lower the strengths, or check the file, which may be damaged. Nothing was "
                           "applied; the weights were left as they were.")


def norm64(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm summed in fp64, so that finite fp32 values (a delta of 1e37) do not overflow it to inf."""
    return torch.linalg.vector_norm(t, dtype=torch.float64)


def product_norm(mod: LoraModule) -> float:
    """The exact Frobenius norm of ``up @ down * alpha / r`` from the r x r Gram matrices (fp64, no full-size
    product): ``||U D||^2 = sum((U^T U) * (D D^T))``."""
    up = mod.tensors["lora_up.weight"].flatten(1).double()
    down = mod.tensors["lora_down.weight"].flatten(1).double()
    return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt()) * abs(mod.scale)
