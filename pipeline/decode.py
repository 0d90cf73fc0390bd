"""One image file, bytes or PIL image -> exactly the uint8 array training sees.

:func:`load_image_file` is the entry point: open, :func:`decode_image` (EXIF orientation, alpha over the background,
wide and exotic modes to 8-bit grey or RGB), then :func:`fit_image` (pad small images, resize and centre-crop
large ones). :func:`conversion_note` says in words what happens to each source mode, for the data summary.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageOps

Background = tuple[int, int, int]


def load_image_file(source: str | Path | bytes | Image.Image, image_size: int, channels: int,
                    background: str | Background = "white") -> np.ndarray:
    """A path, bytes or PIL image -> uint8 array (channels, image_size, image_size), decoded as in training."""
    rgb = ImageColor.getrgb(background)[:3] if isinstance(background, str) else background
    img, _ = decode_image(open_image(source), channels, rgb)
    return fit_image(img, image_size, channels)


def open_image(item: Any) -> Image.Image:
    """A path, bytes, a ``datasets`` image dict ({"bytes", "path"}) or a PIL image -> a loaded PIL image."""
    if isinstance(item, dict):
        item = item["bytes"] if item.get("bytes") is not None else item["path"]
    if isinstance(item, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(item)))
    elif isinstance(item, (str, Path)):
        img = Image.open(item)
    else:
        img = item
    img.load()
    return img


def source_mode(img: Image.Image) -> str:
    """The image's PIL mode, "P+transparency" for palette images with a transparent entry."""
    return "P+transparency" if img.mode == "P" and "transparency" in img.info else img.mode


def exif_rotated(img: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns or mirrors it (orientation other than 1)."""
    try:
        return img.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:  # unreadable EXIF: exif_transpose ignores it too
        return False


_GREY_MODES = {"L", "LA", "La", "1", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def conversion_note(mode: str, channels: int, background: str = "white") -> str:
    """What decoding does to images of source ``mode`` (as :func:`source_mode` names it), in words."""
    steps = []
    if mode in _ALPHA_MODES or mode == "P+transparency":
        steps.append(f"alpha composited over {background}")
    elif mode == "P":
        steps.append("palette -> RGB")
    elif mode in _WIDE_MODES:
        steps.append("16-bit scaled to 8 bits" if mode.startswith("I;16") else
                     "float scaled to 8 bits by its range" if mode == "F" else "32-bit scaled to 8 bits by its range")
    elif mode == "1":
        steps.append("1-bit -> grey")
    elif mode not in ("L", "RGB"):
        steps.append(f"{mode} -> RGB")
    grey = mode in _GREY_MODES
    if channels == 1 and not grey:
        steps.append("colour -> grey (luma)")
    elif channels == 3 and grey:
        steps.append("grey -> RGB (lossless)")
    return "; ".join(steps) or "kept as is"


_ALPHA_MODES = {"LA": "LA", "La": "LA", "PA": "RGBA", "RGBA": "RGBA", "RGBa": "RGBA"}  # mode -> its plain form
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": None, "F": None}  # 16/32-bit, float


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float grey -> 8-bit "L", scaled by its range: 16-bit by 0..65535; 32-bit integers by the
    smallest of 0..255, 0..65535, 0..2^31-1 that holds the values; floats in [0, 1] by 255, other floats by their
    own minimum and maximum."""
    arr = np.asarray(img, dtype=np.float64)
    top = _WIDE_MODES[img.mode]
    if img.mode == "F":
        low, high = (0.0, 1.0) if arr.min() >= 0 and arr.max() <= 1 else (arr.min(), max(arr.max(), arr.min() + 1e-12))
    else:
        low, high = 0.0, top or next(t for t in (255, 65535, 2**31 - 1) if arr.max() <= t)
    scaled = np.clip((arr - low) / (high - low), 0, 1) * 255
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")


def _composite(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """An image with alpha (grey or colour, premultiplied or not, palette) over an opaque ``background``: "L" for
    grey sources, "RGB" for colour ones."""
    plain = _ALPHA_MODES[img.mode]
    rgba = img.convert("RGBA") if plain == "RGBA" else img.convert("LA").convert("RGBA")
    over = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return over.convert("L") if plain == "LA" else over


def decode_image(img: Image.Image, channels: int, background: tuple[int, int, int] = (255, 255, 255)
                 ) -> tuple[Image.Image, bool]:
    """Any image PIL opens -> the 8-bit "L" (``channels`` 1) or "RGB" (3) image training sees, and whether colour
    was turned into grey. EXIF orientation is applied; alpha (RGBA, LA, PA, palette transparency) is composited
    over ``background``; 16/32-bit and float images are scaled to 8 bits by their range; 1-bit, CMYK, YCbCr, LAB
    and HSV are converted. Grey becomes RGB losslessly; colour becomes grey by ITU-R 601 luma (PIL's "L")."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _WIDE_MODES:
        img = _to_8bit(img)
    elif img.mode in _ALPHA_MODES:
        img = _composite(img, background)
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    if channels == 1:
        return (img, False) if img.mode == "L" else (img.convert("L"), True)
    return (img.convert("RGB") if img.mode == "L" else img), False


def fit_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """An "L" or "RGB" image -> uint8 array (channels, size, size): pad if small (centred, border 0), else resize
    the shorter side to ``size`` (PIL bicubic) and centre-crop."""
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if w <= size and h <= size:
        canvas = Image.new(img.mode, (size, size), 0)
        canvas.paste(img, ((size - w) // 2, (size - h) // 2))
        img = canvas
    else:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)  # (C, S, S)
