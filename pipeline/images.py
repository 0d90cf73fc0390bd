"""Image grids and plots written as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.io import atomic_save_png


def grid_image(pixels: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """uint8 images (N, C, H, W) or (N, H, W, C) -> one PIL image, ``nrow`` images per row, 2-px white gaps."""
    arr = pixels.cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
    n, h, w, c = arr.shape
    if n == 0:
        raise ValueError("a grid needs at least one image")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, "L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(path: str | Path, pixels, nrow: int | None = None, scale: int = 2) -> Path:
    return atomic_save_png(path, grid_image(pixels, nrow=nrow, scale=scale))


def labelled_grid(rows: list[tuple[str, torch.Tensor | np.ndarray]], scale: int = 2, pad: int = 2) -> Image.Image:
    """One row of uint8 images (N, C, H, W) per (name, images) pair, each row's name written on its left."""
    from PIL import ImageDraw, ImageFont

    ncol = max(len(p) for _, p in rows)
    strips = [grid_image(p, nrow=ncol, pad=pad, scale=scale).convert("RGB") for _, p in rows]
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(draw.textlength(name, font=font)) for name, _ in rows) + 8
    width = label_w + max(s.width for s in strips)
    canvas = Image.new("RGB", (width, sum(s.height for s in strips)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for (name, _), strip in zip(rows, strips):
        canvas.paste(strip, (label_w, top))
        bbox = draw.textbbox((0, 0), name, font=font)
        draw.text((4, top + (strip.height - (bbox[3] - bbox[1])) // 2 - bbox[1]), name, fill="black", font=font)
        top += strip.height
    return canvas


def class_rows(pixels, labels, class_names: list[str], per_class: int) -> list[tuple[str, np.ndarray]]:
    """The first ``per_class`` images of each class that has any, in class order, as rows for
    :func:`labelled_grid`."""
    pixels, labels = np.asarray(pixels), np.asarray(labels)
    rows = []
    for i, name in enumerate(class_names):
        picked = pixels[labels == i][:per_class]
        if len(picked):
            rows.append((name, picked))
    return rows
