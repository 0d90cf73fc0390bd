"""Stage-1 training images streamed from an image folder, for image sets too large to decode before training.

Before training only the file list is read (:func:`pipeline.sources.list_folder`: cheap, sorted, the folder's
class and split conventions) and split into train and held-out files exactly as decoding up front splits images
(:func:`pipeline.data.split_indices`). DataLoader workers then decode and fit each batch
(:func:`pipeline.decode.load_image_file`, as decoding up front does) and augment it; every process reads only its
own shard of the files (:class:`pipeline.training.ShardSampler`). Start-up time and memory do not grow with the
number of images. The held-out images are read from their files whenever validation asks for them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ImageColor
from torch.utils.data import Dataset

from pipeline.config import DataConfig
from pipeline.data import IN_MEMORY_BYTES, ImageData, IndexedImages, augment, split_indices, to_float
from pipeline.decode import load_image_file
from pipeline.io import UserError
from pipeline.sources import UNREADABLE, FolderFiles, Prepared, list_folder, signature, unreadable_reason


def stream_listing(cfg: DataConfig) -> FolderFiles | None:
    """The folder's listing when stage 1 streams it (data.streaming=always, or auto and its decoded pixels would reach
    IN_MEMORY_BYTES, the size above which even decoded-up-front images are no longer held in memory), else None."""
    if cfg.streaming == "never" or cfg.source != "folder":  # always with another source is refused by the config
        return None
    listed = list_folder(cfg)
    n = sum(len(f) for f in listed.files.values())
    n = min(n, cfg.max_images) if cfg.max_images else n
    return listed if cfg.streaming == "always" or n * cfg.channels * cfg.image_size**2 >= IN_MEMORY_BYTES else None


def load_stream_data(cfg: DataConfig, listed: FolderFiles) -> ImageData:
    """Train and held-out image files of a listed folder, decoded only when read: the folder's own held-out split
    or the seeded carve-out, the same files decoding up front would pick (but for unreadable files, which decoding
    up front drops before splitting). Its signature (the key of cached real-image statistics) is the folder's,
    marked as streamed: stats of the files and settings like decoding up front, never shared with that path,
    whose sets differ when a file is unreadable."""
    own = listed.holdout_name
    files, labels = listed.files["train"], listed.labels["train"]
    train_idx, hold_idx, how = split_indices(len(files), len(listed.files[own]) if own else None, own, cfg)
    hold_files, hold_labels = (listed.files[own], listed.labels[own]) if own else (files, labels)
    train = FileImages([files[i] for i in train_idx], labels[train_idx], cfg)
    holdout = FileImages([hold_files[i] for i in hold_idx], hold_labels[hold_idx], cfg)
    info = {**Prepared({}, listed.class_names, own).info(), "signature": f"streamed-{signature(cfg)}", "cached": False}
    names = listed.class_names
    return ImageData(train, holdout, len(names or []), names, cfg.channels, cfg.image_size,  # type: ignore[arg-type]
                     f"{how}; streamed from the files", info)


class WorkerUserError(UserError):
    """A user-caused failure raised in a DataLoader worker. The loader raises it again in the training process as
    ``<its class>("Caught ... in DataLoader worker ... Original Traceback ... <its class>: <message>")``; only the
    message is kept, so the user still sees one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message.rstrip().rsplit(f"{type(self).__name__}: ", 1)[-1])


class UnreadableImage(WorkerUserError):
    """An unreadable image with data.on_corrupt=error, raised where it is decoded (often a DataLoader worker)."""


def decode_or_skip(source: str | bytes | dict, where: str, size: int, channels: int, background: tuple,
                   on_corrupt: str) -> np.ndarray | None:
    """One image (a path, bytes or a ``datasets`` image dict; ``where`` names it, "" for a path) decoded and fitted
    as training sees it, in whichever process reads it; None when it is unreadable and data.on_corrupt=skip (warned:
    the caller reads the next one in its place), :class:`UnreadableImage` when on_corrupt=error."""
    where = where or str(source)
    try:
        return load_image_file(source, size, channels, background)
    except UNREADABLE as err:
        if on_corrupt == "error":
            raise UnreadableImage(f"cannot read image {where}: {unreadable_reason(err)}; fix or remove it, "
                                  "or set data.on_corrupt=skip") from None
        warnings.warn(f"skipped unreadable image {where}: {unreadable_reason(err)} (data.on_corrupt=skip); "
                      "the next readable one is used in its place", stacklevel=3)
        return None


def augmented_floats(pixels: torch.Tensor, hflip: bool, crop_scale: float, seed_parts: list[int]) -> torch.Tensor:
    """A streamed training batch: uint8 pixels (N, C, S, S) -> floats in [-1, 1], augmented (data.hflip,
    data.crop_scale) by a generator seeded by ``seed_parts`` (where the batch is in the stream), never by the
    worker's RNG: the same whichever worker makes it, and a resumed run draws what the uninterrupted one did."""
    x = to_float(pixels)  # (N, C, S, S)
    if hflip or crop_scale < 1:
        seed = int(np.random.SeedSequence(seed_parts).generate_state(1)[0])
        x = augment(x, hflip, crop_scale, generator=torch.Generator().manual_seed(seed))
    return x


class DecodedOnAccess(IndexedImages):
    """(uint8 pixels (C, S, S), label) of images decoded on access, as :class:`pipeline.data.ImageSet` gives them
    from memory (the same ``__getitems__``, ``labels``, ``all_pixels``; ``pixels`` None as for a large set). An
    unreadable image is replaced by the next readable one (data.on_corrupt=skip, with a warning) or stops (error).
    Subclasses give :meth:`source` (what image ``j`` is read from) and ``__len__``."""

    def __init__(self, labels: np.ndarray, cfg: DataConfig) -> None:
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.size, self.channels, self.on_corrupt = cfg.image_size, cfg.channels, cfg.on_corrupt
        self.background = ImageColor.getrgb(cfg.background)[:3]
        self.workers = cfg.num_workers  # decoding processes where a stage reads many images (read_batches)
        self.pixels = None  # as a large ImageSet: never held in memory as one tensor

    def source(self, j: int) -> tuple[str | bytes | dict, str]:
        """What image ``j`` is decoded from, and its name in messages ("": the path names it)."""
        raise NotImplementedError

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """The pixels of image ``index``, or of the first readable one after it; and which image was read."""
        for tried in range(len(self)):
            j = (index + tried) % len(self)
            pixels = decode_or_skip(*self.source(j), self.size, self.channels, self.background, self.on_corrupt)
            if pixels is not None:
                return pixels, j
        raise UserError(f"none of the {len(self)} images can be read; check data.path or data.name")

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, read = zip(*(self.read(int(i)) for i in indices))
        return torch.from_numpy(np.stack(pixels)), self.labels[list(read)]


class FileImages(DecodedOnAccess):
    """Image files decoded on access. The paths are one numpy byte array, not a list of strings: forked workers then
    share its pages instead of copying them as reference counts change
    (https://github.com/pytorch/pytorch/issues/13246)."""

    def __init__(self, files: list[Path], labels: np.ndarray, cfg: DataConfig) -> None:
        super().__init__(labels, cfg)
        self.paths = np.array([os.fsencode(p) for p in files], dtype=np.bytes_)

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, j: int) -> tuple[str, str]:
        return os.fsdecode(self.paths[j]), ""


class StreamedTraining(Dataset):
    """The training side of streamed files: ``__getitems__`` takes a :class:`pipeline.training.ShardSampler` batch
    of ``(index, epoch)`` pairs and returns (float images in [-1, 1], augmented; labels), ready for the model, made
    in a DataLoader worker. A batch's augmentation is drawn from a generator seeded by (seed, epoch, its first
    index), not by the worker's RNG: the same whichever worker makes it, and a resumed run draws what the
    uninterrupted one did."""

    def __init__(self, images: FileImages, hflip: bool, crop_scale: float, seed: int) -> None:
        self.images, self.hflip, self.crop_scale, self.seed = images, hflip, crop_scale, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, picks: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = self.images.__getitems__([index for index, _ in picks])
        first, epoch = picks[0]
        return augmented_floats(pixels, self.hflip, self.crop_scale, [self.seed, epoch, first]), labels
