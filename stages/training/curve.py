"""The loss curve of a training run as a PNG, drawn with Pillow (no plotting package needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

WIDTH, HEIGHT, MARGIN = 800, 450, 60


def draw_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | os.PathLike,
                    title: str) -> None:
    """Training loss against step, axes labelled with their ranges, written to ``path`` (PNG)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, 8), title, fill="black")
    points = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if points:
        first, last = points[0][0], max(points[-1][0], points[0][0] + 1)
        low, high = min(v for _, v in points), max(v for _, v in points)
        high = high if high > low else low + 1.0

        def xy(step: float, value: float) -> tuple[float, float]:
            return (left + (step - first) / (last - first) * (right - left),
                    bottom - (value - low) / (high - low) * (bottom - top))

        for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
            value = low + fraction * (high - low)
            y = xy(first, value)[1]
            draw.line((left - 4, y, left, y), fill="black")
            draw.text((4, y - 6), f"{value:.3g}", fill="black")
        draw.text((left, bottom + 8), str(first), fill="black")
        draw.text((right - 40, bottom + 8), str(points[-1][0]), fill="black")
        draw.text(((left + right) // 2 - 30, bottom + 24), "optimiser step", fill="black")
        draw.text((4, top - 14), "loss", fill="black")
        if len(points) == 1:
            x, y = xy(*points[0])
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(31, 119, 180))
        else:
            draw.line([xy(s, v) for s, v in points], fill=(31, 119, 180), width=2)
    image.save(path, format="PNG")
