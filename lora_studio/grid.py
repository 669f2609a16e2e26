"""Labelled image grids (pure PIL): rows x columns of equal-size images with text headers."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def labelled_grid(images: Sequence[Sequence[Image.Image]], col_labels: Sequence[str] = (),
                  row_labels: Sequence[str] = (), scale: int = 1, pad: int = 4) -> Image.Image:
    """Lay out ``images[row][col]`` with column labels on top and row labels on the left.

    ``scale`` enlarges small pictures (nearest neighbour) so 64 px demo images are readable.
    """
    rows = [list(r) for r in images]
    if not rows or not rows[0]:
        raise ValueError("labelled_grid needs at least one image")
    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    font = _font()
    text_h = 16 if col_labels else 0
    label_w = (max((int(font.getlength(t)) for t in row_labels), default=0) + 2 * pad) if row_labels else 0
    n_cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (label_w + n_cols * (w + pad) + pad, text_h + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(col_labels):
        draw.text((label_w + pad + c * (w + pad), 2), _fit(label, font, w), fill="black", font=font)
    for r, row in enumerate(rows):
        y = text_h + pad + r * (h + pad)
        if r < len(row_labels):
            draw.text((pad, y + h // 2 - 6), row_labels[r], fill="black", font=font)
        for c, img in enumerate(row):
            tile = img.convert("RGB")
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            sheet.paste(tile, (label_w + pad + c * (w + pad), y))
    return sheet


def _fit(text: str, font, width: int) -> str:
    while text and font.getlength(text) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text
