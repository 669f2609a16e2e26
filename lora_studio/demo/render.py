"""A sample grid of the demo prompts, to show a user what the built-in model draws."""

from __future__ import annotations

from pathlib import Path

import torch

from ..grid import labelled_grid
from .model import DEMO_PROMPTS, DEMO_RESOLUTION
from ..fileio import atomic_path


def sample_grid(pipe, out: str | Path, steps: int = 20, seeds: tuple[int, ...] = (0, 1), cfg: float = 3.0) -> Path:
    rows = []
    for seed in seeds:
        row = []
        for prompt in DEMO_PROMPTS:
            gen = torch.Generator().manual_seed(seed)
            row.append(pipe(prompt, num_inference_steps=steps, guidance_scale=cfg, generator=gen,
                            height=DEMO_RESOLUTION, width=DEMO_RESOLUTION).images[0])
        rows.append(row)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    with atomic_path(out) as tmp:  # the .part name hides the format from PIL: name it
        labelled_grid(rows, DEMO_PROMPTS, [f"seed {s}" for s in seeds], scale=2).save(
            tmp, format="JPEG" if out.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return out
