"""Per-block weights, as the LoRA Block Weight extension applies them: which weight each UNet layer of an entry
gets, and which keys a user may give.

**Per-block weights** (as the LoRA Block Weight extension does): a dict whose keys are

* diffusers blocks: ``"down"``, ``"mid"``, ``"up"``, ``"other"`` (conv_in, time embedding, conv_out) or a single
  block ``"down.0"``, ``"up.2"`` (``down.0`` is the highest-resolution down block, ``up.0`` the lowest-resolution
  up block);
* or the extension's own names, one per original (ldm) UNet layer: ``"IN00"``..``"IN11"``, ``"M00"``,
  ``"OUT00"``..``"OUT11"`` (SD 1.x numbering; SDXL has IN00..IN08, OUT00..OUT08), and ``"BASE"`` for the text
  encoders. ``lbw_block_weights`` turns the extension's 17/26 (SD 1.x) or 12/20 (SDXL) value lists into these.

The most specific key wins (``IN04`` over ``down.1`` over ``down``); unlisted blocks weigh 1. Block weights
multiply the UNet strength; only ``BASE`` touches the text encoders (times ``te_strength``).
"""

from __future__ import annotations

from typing import Mapping

from ..errors import ConfigError
from ..lora.keys import UnetLayout, diffusers_unet_to_ldm, unet_block_of

BLOCK_GROUPS = ("down", "mid", "up", "other")
# The LoRA Block Weight extension's value lists, by length: which layer each value weighs.
_IN, _OUT = [f"IN{i:02d}" for i in range(12)], [f"OUT{i:02d}" for i in range(12)]
LBW_LAYOUTS = {
    17: ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[3:]],  # SD 1.x with attention
    26: ["BASE", *_IN, "M00", *_OUT],                                                  # SD 1.x, every layer
    12: ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[:6]],                   # SDXL with attention
    20: ["BASE", *_IN[:9], "M00", *_OUT[:9]],                                         # SDXL, every layer
}


def lbw_block_weights(values: list[float] | str) -> dict[str, float]:
    """The LoRA Block Weight extension's list (``"1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"``) as block-weight keys."""
    if isinstance(values, str):
        try:
            values = [float(v) for v in values.replace(" ", "").split(",") if v]
        except ValueError as err:
            raise ConfigError(f"block weights {values!r} should be comma-separated numbers ({err}).") from err
    if len(values) not in LBW_LAYOUTS:
        raise ConfigError(f"a LoRA Block Weight list has 17 or 26 values (SD 1.x) or 12 or 20 (SDXL); "
                          f"got {len(values)}: {values}.")
    return dict(zip(LBW_LAYOUTS[len(values)], (float(v) for v in values)))


class UnetBlocks:
    """The block names of one UNet: its down/up block counts and each module's LoRA Block Weight layer."""

    def __init__(self, unet) -> None:
        self.n_down = len(getattr(unet, "down_blocks", ()))
        self.n_up = len(getattr(unet, "up_blocks", ()))
        self.lbw: dict[str, str] = {}  # UNet module name -> LoRA Block Weight layer name (IN04, M00, OUT11)
        if unet is not None:
            layout = UnetLayout.from_config(unet.config)
            for mname, _ in unet.named_modules():
                ldm = diffusers_unet_to_ldm(mname, layout) if mname else None
                if ldm and ldm.startswith(("input_blocks.", "output_blocks.", "middle_block.")):
                    kind, idx = ldm.split(".")[:2]
                    self.lbw[mname] = ("M00" if kind == "middle_block" else
                                       f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(idx):02d}")

    def check(self, blocks: Mapping[str, float]) -> dict[str, float]:
        """``blocks`` as floats, or ``ConfigError`` naming the keys this UNet has no block for."""
        valid = set(BLOCK_GROUPS) | {f"down.{i}" for i in range(self.n_down)} | {f"up.{i}" for i in range(self.n_up)}
        lbw = {"BASE"} | set(self.lbw.values())
        # the extension's lists name layers some models lack (SD 1.x IN03 is a downsampler); only unknown names fail
        known = lbw | set(_IN) | set(_OUT) | {"M00"}
        bad = [k for k in blocks if k not in valid and k not in known]
        if bad:
            raise ConfigError(f"unknown block weight key(s) {bad}; use {', '.join(BLOCK_GROUPS)}, "
                              f"down.0..down.{self.n_down - 1}, up.0..up.{self.n_up - 1}, or the LoRA Block "
                              f"Weight names {', '.join(sorted(lbw))}.")
        return {k: float(v) for k, v in blocks.items()}

    def weight(self, blocks: Mapping[str, float], component: str, module_name: str) -> float:
        """The block weight ``blocks`` give one module: ``BASE`` for the text encoders; for the UNet the most
        specific key (``IN04`` over ``down.1`` over ``down``), 1 when none is listed."""
        if component != "unet":
            return blocks.get("BASE", 1.0)
        group, idx = unet_block_of(module_name)
        weight = blocks.get(f"{group}.{idx}", blocks.get(group, 1.0)) if idx is not None else blocks.get(group, 1.0)
        layer = self.lbw.get(module_name)
        return blocks[layer] if layer is not None and layer in blocks else weight
