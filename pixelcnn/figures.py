"""Pictures a user looks at: contact sheets of images, and training curves, as PNG bytes (Pillow only)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, GRID = (255, 255, 255), (40, 40, 40), (225, 225, 225)
SERIES = {"train_bits_per_dim": ((31, 119, 180), "train"), "test_bits_per_dim": ((214, 39, 40), "test")}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def grid(images: torch.Tensor | np.ndarray, *, scale: int = 4, columns: int | None = None, pad: int = 2) -> Image.Image:
    """A contact sheet of uint8 images ``[N, C, H, W]``, each enlarged ``scale`` times (nearest neighbour,
    so every pixel stays a visible square), on a grey background."""
    images = np.asarray(images, dtype=np.uint8)
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    sheet = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for k, image in enumerate(images):
        r, col = divmod(k, columns)
        rgb = np.repeat(image, 3, axis=0) if c == 1 else image
        sheet[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = rgb.transpose(1, 2, 0)
    picture = Image.fromarray(sheet)
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST) if scale > 1 else picture


def grid_png(images, *, scale: int = 4) -> bytes:
    return png(grid(images, scale=scale))


def metrics_png(history: list[dict], *, size: tuple[int, int] = (640, 400)) -> bytes:
    """Train and test bits/dim against step, one line each, with labelled axes."""
    series = {label: (colour, [(m["step"], m[name]) for m in history if name in m and math.isfinite(m[name])])
              for name, (colour, label) in SERIES.items()}
    return lines_png(series, title="bits/dim against step", xlabel="step", size=size)


# Colours of further lines (lines_png), after the train and test ones.
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def lines_png(series: dict[str, tuple[tuple[int, int, int], list[tuple[float, float]]]], *, title: str, xlabel: str,
              size: tuple[int, int] = (640, 400)) -> bytes:
    """A line plot: ``series`` maps each line's label to (its colour, its (x, y) points)."""
    width, height = size
    left, right, top, bottom = 64, 16, 28, 40
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.font = ImageFont.load_default(size=13)
    values = [v for _, points in series.values() for _, v in points]
    xs = [s for _, points in series.values() for s, _ in points]
    draw.text((left, 8), title, fill=INK)
    if not values:
        return png(image)
    low, high = min(values), max(values)
    pad = (high - low) * 0.05 or 0.05
    low, high = low - pad, high + pad
    first, last = min(xs + [0]), max(xs + [1])

    def x(step):
        return left + (step - first) / max(last - first, 1) * (width - left - right)

    def y(value):
        return top + (high - value) / (high - low) * (height - top - bottom)

    for k in range(5):  # horizontal grid lines with their values
        value = low + (high - low) * k / 4
        draw.line([(left, y(value)), (width - right, y(value))], fill=GRID)
        draw.text((4, y(value) - 6), f"{value:.3f}", fill=INK)
    for k in range(5):
        step = first + (last - first) * k / 4
        draw.text((x(step) - 10, height - bottom + 6), f"{step:.0f}", fill=INK)
    draw.rectangle([left, top, width - right, height - bottom], outline=INK)
    legend = width - right
    for label, (colour, points) in reversed(list(series.items())):  # the legend, right-aligned
        legend -= draw.textlength(label) + 16
        draw.text((legend, 8), label, fill=colour)
    for colour, points in series.values():
        xy = [(x(s), y(v)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
    draw.text((width // 2 - 3 * len(xlabel), height - 16), xlabel, fill=INK)
    return png(image)


def score_report_png(groups: dict[str, tuple[np.ndarray, np.ndarray]], all_bits: np.ndarray, *, scale: int = 3) -> bytes:
    """The scoring job's report: for each named group (e.g. "most likely", "least likely") a row of its
    images ``[N, C, H, W]`` with each one's bits/dim beneath, then a histogram of every image's bits/dim."""
    font = ImageFont.load_default(size=12)
    rows = []
    for name, (images, bits) in groups.items():
        n, _, h, w = images.shape
        cell = max(w * scale, 48)
        row = Image.new("RGB", (max(1, n) * (cell + 6) + 6, h * scale + 40), BACKGROUND)
        draw = ImageDraw.Draw(row)
        draw.font = font
        draw.text((6, 2), f"{name} ({n})", fill=INK)
        for k in range(n):
            picture = grid(images[k:k + 1], scale=scale, pad=0)
            row.paste(picture, (6 + k * (cell + 6), 18))
            draw.text((6 + k * (cell + 6), 20 + h * scale), f"{bits[k]:.3f}", fill=INK)
        rows.append(row)
    histogram = _histogram(np.asarray(all_bits, dtype=np.float64), font)
    width = max([r.width for r in rows] + [histogram.width])
    sheet = Image.new("RGB", (width, sum(r.height for r in rows) + histogram.height), BACKGROUND)
    y = 0
    for picture in rows + [histogram]:
        sheet.paste(picture, (0, y))
        y += picture.height
    return png(sheet)


def _histogram(values: np.ndarray, font, size=(640, 260), bins: int = 40) -> Image.Image:
    width, height = size
    left, bottom, top = 48, 36, 24
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.font = font
    draw.text((left, 4), f"bits/dim of {len(values)} images", fill=INK)
    if not len(values):
        return image
    counts, edges = np.histogram(values, bins=bins)
    peak = max(1, counts.max())
    bar = (width - left - 16) / bins
    for k, count in enumerate(counts):
        x0 = left + k * bar
        y0 = height - bottom - (height - bottom - top) * count / peak
        draw.rectangle([x0, y0, x0 + bar - 1, height - bottom], fill=SERIES["train_bits_per_dim"][0])
    draw.line([(left, height - bottom), (width - 16, height - bottom)], fill=INK)
    for k in (0, bins // 2, bins):
        draw.text((left + k * bar - 12, height - bottom + 6), f"{edges[k]:.2f}", fill=INK)
    draw.text((4, top), f"{peak}", fill=INK)
    return image
