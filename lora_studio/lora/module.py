"""One adapted layer of a LoRA file (``LoraModule``): its kind, tensors, alpha and rank."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kinds import Kind, kind_of


@dataclass
class LoraModule:
    """One adapted layer of a LoRA file, keyed by its kohya base name (e.g. ``lora_unet_..._attn1_to_q``).

    ``kind`` is one of "lora" (linear), "locon" (conv), "loha", "lokr", "full" (a plain weight diff); its
    maths is ``spec`` (``kinds.kind_of``). ``tensors`` holds the file's tensors under their suffixes
    (``lora_down.weight``, ``lora_up.weight``, ``hada_w1_a``, ``lokr_w1``, ``dora_scale``, ...). ``alpha`` is
    None when the file has none (then alpha = rank).
    """

    name: str
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    rank: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_updown(cls, name: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> "LoraModule":
        """A classic LoRA module: ``down`` is (r, in) or (r, in, kh, kw); ``up`` is (out, r) or (out, r, 1, 1)."""
        kind = "locon" if down.dim() == 4 else "lora"
        return cls(name, kind, {"lora_down.weight": down, "lora_up.weight": up}, alpha, int(down.shape[0]))

    @property
    def spec(self) -> Kind:
        return kind_of(self.kind)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor kohya applies to up @ down (alpha defaults to the rank)."""
        if self.rank <= 0:
            return 1.0
        return (self.alpha if self.alpha is not None else self.rank) / self.rank
