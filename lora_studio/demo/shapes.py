"""Pictures for the tiny demo model: coloured shapes on white, and a striped style.

Both the demo model's own training images and the demo *style* dataset (what a
user would train a LoRA on) are drawn here with PIL, deterministically.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
WORDS = tuple(COLORS) + SHAPES + ("a", "an", "of", "on", "white", "background", "striped", "stripes",
                                  "style", "shape", "picture", "photo", "black", "outline", "sks", "drawing")


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    cx: float      # centre, as a fraction of the image size
    cy: float
    radius: float  # half the extent, as a fraction of the image size

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape}"


def random_spec(rng: random.Random, jitter: float = 0.06) -> ShapeSpec:
    return ShapeSpec(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        cx=0.5 + rng.uniform(-jitter, jitter),
        cy=0.5 + rng.uniform(-jitter, jitter),
        radius=rng.uniform(0.26, 0.34),
    )


def _outline(spec: ShapeSpec, size: int) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    cx, cy, r = spec.cx * size, spec.cy * size, spec.radius * size
    if spec.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    return (cx - r, cy - r, cx + r, cy + r)


def draw_shape(spec: ShapeSpec, size: int = 64) -> Image.Image:
    """A flat coloured shape on a white background."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    _fill(ImageDraw.Draw(img), spec, size, COLORS[spec.color])
    return img


def _fill(draw: ImageDraw.ImageDraw, spec: ShapeSpec, size: int, fill) -> None:
    box = _outline(spec, size)
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(box, fill=fill)


def shape_mask(spec: ShapeSpec, size: int = 64) -> Image.Image:
    """An 'L' mask that is 255 inside the shape: used by tests to measure colour in the shape region."""
    img = Image.new("L", (size, size), 0)
    _fill(ImageDraw.Draw(img), spec, size, 255)
    return img


def draw_striped(spec: ShapeSpec, size: int = 64, period: int = 16) -> Image.Image:
    """The demo *style*: the same shape crossed by thick black horizontal stripes over the whole picture."""
    img = draw_shape(spec, size)
    draw = ImageDraw.Draw(img)
    for y in range(0, size, period):
        draw.rectangle((0, y, size - 1, y + period // 2 - 1), fill=(20, 20, 20))
    return img
