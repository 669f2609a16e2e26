"""Mixing LoRAs on a loaded model: ``mixer`` (``LoraMixer``: the strengths and the weights they give),
``originals`` (where W0 is kept), ``session`` (``MixSession``: what the CLI and the app talk to), ``compare``
(comparison rows and X/Y grids), ``presets`` (mixing presets as JSON) and ``args`` (what users type)."""

from .blocks import BLOCK_GROUPS, LBW_LAYOUTS, lbw_block_weights
from .mixer import LoraMixer, MixEntry

__all__ = ["BLOCK_GROUPS", "LBW_LAYOUTS", "LoraMixer", "MixEntry", "lbw_block_weights"]
