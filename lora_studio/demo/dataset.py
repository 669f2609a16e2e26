"""The demo *style* dataset: striped shapes with captions, what a user would train a LoRA on."""

from __future__ import annotations

import random
from pathlib import Path

from .model import DEMO_RESOLUTION
from .shapes import ShapeSpec, draw_striped, random_spec

def make_demo_dataset(out_dir: str | Path, count: int = 24, seed: int = 1, repeats: int = 10,
                      trigger: str = "") -> Path:
    """Write the demo *style* dataset: striped shapes with ``.txt`` captions, in a kohya ``N_name`` folder."""
    folder = Path(out_dir) / f"{repeats}_stripes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        spec: ShapeSpec = random_spec(rng)
        draw_striped(spec, DEMO_RESOLUTION).save(folder / f"{i:03d}.png")
        caption = f"{trigger}, {spec.caption}" if trigger else spec.caption
        (folder / f"{i:03d}.txt").write_text(caption, encoding="utf-8")
    return Path(out_dir)
