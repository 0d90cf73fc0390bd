"""Image data on Hugging Face ``datasets``: the embedded digits, a local image folder, a Hub dataset or IDX files.

Every source is prepared once (:mod:`pipeline.sources`, decoded by :mod:`pipeline.decode`) into ``datasets.Dataset``
splits with two columns, ``pixels`` (uint8, C x S x S) and ``label`` (int, -1 where the source has none), optionally
cached in a folder, then split into train and held-out parts: the source's own held-out split or a fixed seeded
carve-out. Training code turns pixels into floats in [-1, 1] with :func:`to_float` and may :func:`augment` them.
Stage 1 can instead stream a large image folder, decoding in the loader's workers (:mod:`pipeline.streaming`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from pipeline.config import DataConfig
from pipeline.decode import conversion_note, decode_image, fit_image, load_image_file  # noqa: F401 (re-exported)
from pipeline.io import UserError
from pipeline.sources import Prepared, prepare, signature

IN_MEMORY_BYTES = 2 * 1024**3  # image sets smaller than this are held as one tensor


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded and clamped."""
    return images.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------


class IndexedImages(Dataset):
    """What every image set gives on top of its batched ``__getitems__``: one item, and the first images."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = self.__getitems__([index])
        return pixels[0], labels[0]

    def all_pixels(self, limit: int | None = None) -> torch.Tensor:
        n = len(self) if limit is None else min(limit, len(self))
        return self.__getitems__(list(range(n)))[0]


class ImageSet(IndexedImages):
    """(uint8 pixels (C, S, S), label) pairs over a ``datasets.Dataset``; supports batched ``__getitems__``.
    Small sets are held as one tensor; large ones are read from the memory-mapped Arrow table."""

    workers = 0  # reading is a copy out of memory or a memory map: worker processes would only add start-up

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


class ShiftedCopies(IndexedImages):
    """The images of ``images`` followed by ``copies`` shifted copies of each, the labels repeated: item
    ``c * n + j`` is image ``j`` moved by a whole-pixel offset in [-shift, shift]^2 other than (0, 0) (edge pixels
    repeated into the gap) for copy ``c`` >= 1, and image ``j`` itself for c = 0. The offset depends only on
    (seed, item), never on the batch: more code grids for the priors from the same images (extract.copies)."""

    def __init__(self, images: Dataset, copies: int, shift: int, seed: int) -> None:
        self.images, self.copies, self.shift, self.seed = images, copies, shift, seed
        self.workers = images.workers
        self.offsets = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)
                        if (dy, dx) != (0, 0)]

    def __len__(self) -> int:
        return len(self.images) * (1 + self.copies)

    def record(self) -> dict:
        """What the code manifest records of these copies (an extraction is reused only with the same record)."""
        return {"copies": self.copies, "shift": self.shift}

    def offset(self, index: int) -> tuple[int, int]:
        if index < len(self.images):
            return 0, 0
        return self.offsets[int(np.random.default_rng([self.seed, index]).integers(len(self.offsets)))]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.images)
        pixels, labels = self.images.__getitems__([i % n for i in indices])
        out = pixels.clone()
        size = pixels.shape[-1]
        for row, index in enumerate(indices):
            dy, dx = self.offset(index)
            if dy or dx:
                ys = (torch.arange(size) - dy).clamp(0, size - 1)
                xs = (torch.arange(size) - dx).clamp(0, size - 1)
                out[row] = pixels[row][:, ys][:, :, xs]
        return out, labels


def read_batches(images: Dataset, batches: list[list[int]]) -> Iterator[Any]:
    """``images.__getitems__`` of each list of indices (for an image set: uint8 pixels, labels), in order, read by
    ``images.workers`` DataLoader worker processes (files streamed by :class:`pipeline.streaming.FileImages`
    decode in parallel; 0: in this process)."""
    loader = DataLoader(images, batch_sampler=batches, collate_fn=_as_read, num_workers=images.workers)
    yield from loader


def _as_read(batch: Any) -> Any:
    return batch  # ``__getitems__`` already made the batch


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
    holdout_source: str  # where the held-out images come from, in words
    prepared: dict[str, Any]  # what preparation found and did (Prepared.info()), its signature, whether cached

    @property
    def skipped(self) -> int:
        return len(self.prepared["skipped"])

    @property
    def train_images(self) -> int | None:
        """How many training images; a stream (no ``__len__``) counts them by its metadata, None when it does not."""
        return len(self.train) if hasattr(self.train, "__len__") else getattr(self.train, "count", None)

    @property
    def first_images(self) -> IndexedImages:
        """Where the first images of the data come from (the preview): the training set, or the held-out set when
        training is a stream without random access."""
        return self.train if hasattr(self.train, "__getitems__") else self.holdout


def load_image_data(cfg: DataConfig, cache_dir: Path | None = None) -> ImageData:
    """Load the configured source (prepared once and kept in ``cache_dir`` when given) and split it into train and
    held-out sets: the source's own held-out split when it has one (data.holdout_split=auto), else a seeded
    carve-out of data.holdout_fraction."""
    sig = signature(cfg)  # once per load: for a folder it stats every file
    prepared, cached = _cached_prepare(cfg, cache_dir, sig) if cache_dir else (prepare(cfg), False)
    if prepared.skipped:
        warnings.warn(f"skipped {len(prepared.skipped)} unreadable image(s) (data.on_corrupt=skip), e.g. "
                      f"{prepared.skipped[0][0]}: {prepared.skipped[0][1]}", stacklevel=2)
    if prepared.greyed:
        warnings.warn(f"converted {prepared.greyed} colour image(s) to grey (data.channels=1; set data.channels=3 to "
                      "keep colour)", stacklevel=2)
    train, holdout, how = _split(prepared, cfg)
    names = prepared.class_names
    info = {**prepared.info(), "signature": sig, "cached": cached}
    return ImageData(ImageSet(train), ImageSet(holdout), len(names or []), names, cfg.channels, cfg.image_size,
                     how, info)


def _split(prepared: Prepared, cfg: DataConfig):
    ds = prepared.splits["train"]
    hold = prepared.splits[prepared.holdout_name] if prepared.holdout_name else None
    train_idx, hold_idx, how = split_indices(len(ds), None if hold is None else len(hold), prepared.holdout_name, cfg)
    return ds.select(train_idx), (ds if hold is None else hold).select(hold_idx), how


def split_indices(n: int, n_own: int | None, own_name: str, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Which of ``n`` training-source images train and which are held out, and how in words: with no held-out split
    of the source's own (``n_own`` None) a seeded carve-out of data.holdout_fraction (shuffled order, mixed
    classes; both index the training source); else a seeded subset of each split, the held-out indices into the
    own split. Decoding up front and streaming both call this, so they split alike."""
    rng = np.random.default_rng(cfg.split_seed)
    if n_own is None:
        order = rng.permutation(n)
        if cfg.max_images:
            order = order[: cfg.max_images]
        n_hold = max(1, int(round(len(order) * cfg.holdout_fraction)))
        if len(order) - n_hold < 2:
            raise UserError(f"only {n} usable image(s) in the data; need at least 3 for a train/held-out split")
        how = f"a seeded {cfg.holdout_fraction:.0%} carve-out, data.split_seed={cfg.split_seed}"
        return order[n_hold:], order[:n_hold], how
    n_train, n_hold = n, n_own
    if cfg.max_images:
        n_hold = min(n_hold, max(1, int(round(cfg.max_images * cfg.holdout_fraction))))
        n_train = min(n_train, max(cfg.max_images - n_hold, 0))
    if n_train < 2:
        raise UserError(f"only {n_train} training image(s); need at least 2 (raise data.max_images or add images)")
    how = f"the data's own {own_name} split" + (f", {n_hold} of {n_own} drawn with data.split_seed="
                                               f"{cfg.split_seed}" if n_hold < n_own else "")
    return rng.permutation(n)[:n_train], rng.permutation(n_own)[:n_hold], how


def _cached_prepare(cfg: DataConfig, cache_dir: Path, sig: str) -> tuple[Prepared, bool]:
    """``prepare`` once per data signature: the prepared splits are saved under ``cache_dir/<signature>/`` (written
    to a temporary folder, then renamed; older signatures are removed) and loaded from there next time. Also
    whether they came from the cache."""
    import datasets

    folder = Path(cache_dir) / f"{cfg.source}-{sig}"
    if (folder / "info.json").is_file():
        info = json.loads((folder / "info.json").read_text())
        splits = {name: datasets.load_from_disk(str(folder / name)) for name in info["splits"]}
        return Prepared(splits, info["class_names"], info["holdout_name"], info["modes"], info["rotated"],
                        info["greyed"], info["skipped"]), True
    prepared = prepare(cfg)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=cache_dir))
    tmp.chmod(0o755)
    datasets.disable_progress_bars()
    try:
        for name, ds in prepared.splits.items():
            ds.save_to_disk(str(tmp / name))
        (tmp / "info.json").write_text(json.dumps({**prepared.info(), "splits": list(prepared.splits)}, indent=1))
        for old in Path(cache_dir).iterdir():
            if old.is_dir() and not old.name.startswith(".") and old != folder:
                shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "info.json").is_file():  # not another process winning the same race
            raise
    finally:
        datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)
    return prepared, False


def real_provenance(data: ImageData, cfg: DataConfig, split: str, seed: int = 0) -> dict[str, Any]:
    """What picks a set of real images: the prepared data (its signature), how it is split, which split, and the
    seed of the subset; the key of cached reference features."""
    return {"data": data.prepared["signature"], "split": split, "seed": seed, "holdout_split": cfg.holdout_split,
            "holdout_fraction": cfg.holdout_fraction, "split_seed": cfg.split_seed, "max_images": cfg.max_images}


def data_summary(data: ImageData, cfg: DataConfig) -> dict[str, Any]:
    """What the data is, as JSON: images per split and class, class names, the modes found and what decoding did to
    each, skipped files with reasons, and where the held-out images come from."""
    def per_class(images: ImageSet) -> dict[str, int] | None:
        if not data.class_names or not hasattr(images, "labels"):  # a stream's labels are not known before reading
            return None
        counts = np.bincount(images.labels.numpy(), minlength=data.num_classes)
        return {name: int(c) for name, c in zip(data.class_names, counts)}

    p = data.prepared
    return {
        "source": {k: getattr(cfg, k) for k in ("source", "name", "path", "split", "holdout_split") if getattr(cfg, k)},
        "image_size": data.image_size, "channels": data.channels,
        "images": {"train": data.train_images, "holdout": len(data.holdout)},
        "holdout_source": data.holdout_source,
        "class_names": data.class_names,
        "per_class": {"train": per_class(data.train), "holdout": per_class(data.holdout)},
        "modes": {m: {"images": n, "conversion": conversion_note(m, cfg.channels, cfg.background)}
                  for m, n in sorted(p["modes"].items())},
        "exif_rotated": p["rotated"], "colour_to_grey": p["greyed"],
        "skipped": [{"file": f, "reason": r} for f, r in p["skipped"]],
        "augmentation": {"hflip": cfg.hflip, "crop_scale": cfg.crop_scale},
    }


def augment(x: torch.Tensor, hflip: bool, crop_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-only augmentation of float images (N, C, S, S), drawn per image from ``generator`` (torch's global
    one when None): a random resized crop keeping a share in [crop_scale, 1] of the area (aspect ratio 3/4..4/3,
    bilinear, back to S x S) when crop_scale < 1, then a left-right flip with probability 1/2 when ``hflip``."""
    n, g = x.shape[0], generator
    if crop_scale < 1:
        area = torch.empty(n).uniform_(crop_scale, 1.0, generator=g)
        ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g).exp()
        sw, sh = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = sw, sh
        theta[:, 0, 2] = (torch.rand(n, generator=g) * 2 - 1) * (1 - sw)
        theta[:, 1, 2] = (torch.rand(n, generator=g) * 2 - 1) * (1 - sh)
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if hflip:
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
