"""Stage-1 training images streamed from a Hugging Face dataset (data.source=hub), for sets too large to decode
(or download) before training.

Stage 1 opens the training split with ``datasets.load_dataset(name, split=..., streaming=True)``: nothing is
downloaded or decoded before step 1. Each process reads its own part (``datasets.distributed.split_dataset_by_node``:
whole shard files when their count divides, else every world-th example), and each of its DataLoader workers a part
of that (the same split again), in blocks of :data:`SHUFFLE_BLOCK` examples shuffled by a seeded generator. Workers
decode and fit each image with the folder path's code (:func:`pipeline.streaming.decode_or_skip`) and augment each
batch (:func:`pipeline.streaming.augmented_floats`). Every batch carries its reader's position (epoch, block, the
``datasets`` ``state_dict()`` at the block's start, examples used of it); the loop records the position of the
batches it takes (:meth:`HubStream.take`), the checkpoint keeps every rank's, and a resumed run continues each reader
where it stopped, so it sees the batches the uninterrupted run would have seen.

The held-out images are the first ``data.stream_holdout`` examples of the dataset's own held-out split (streamed too,
their encoded bytes kept in memory and decoded on access): a streamed dataset without one is refused, since a
carve-out would have to be skipped by every reader of the training split. The later stages read the training split
map-style (``load_dataset`` without streaming: the encoded files in the ``datasets`` cache, decoded batch by batch).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from PIL import ImageColor
from torch.utils.data import IterableDataset

from pipeline.config import DataConfig
from pipeline.data import IN_MEMORY_BYTES, ImageData
from pipeline.io import UserError
from pipeline.sources import Prepared, hub_columns, hub_error, hub_holdout, signature
from pipeline.streaming import DecodedOnAccess, WorkerUserError, augmented_floats, decode_or_skip

SHUFFLE_BLOCK = 1024  # examples a reader shuffles at a time: its images' encoded bytes are held in memory


def hub_streams(cfg: DataConfig) -> bool:
    """Whether the stages stream this Hub dataset: data.streaming=always, or auto and the training split's decoded
    pixels would reach IN_MEMORY_BYTES by the example count in its metadata (``load_dataset_builder``: no data is
    read; a dataset whose metadata gives no count, e.g. a local folder of parquet files, is not streamed by auto)."""
    if cfg.source != "hub" or cfg.streaming == "never":
        return False
    if cfg.streaming == "always":
        return True
    import datasets

    try:
        splits = datasets.load_dataset_builder(cfg.name).info.splits or {}
    except Exception:  # noqa: BLE001 - no metadata: decode up front, whose loader reports a bad name in one line
        return False
    n = splits[cfg.split].num_examples if cfg.split in splits else 0
    return n * cfg.channels * cfg.image_size**2 >= IN_MEMORY_BYTES


def _open(cfg: DataConfig, streaming: bool, split: str | None = None):
    """The dataset (every split when ``split`` is None), its image column left encoded ({"bytes", "path"})."""
    import datasets

    try:
        ds = datasets.load_dataset(cfg.name, split=split, streaming=streaming)
    except Exception as err:  # network, missing dataset or files, bad split: one line for the user
        raise hub_error(cfg, err) from None
    return ds.cast_column(cfg.image_key, datasets.Image(decode=False)) if split else ds


def _layout(cfg: DataConfig, dd) -> tuple[str, str, list[str] | None]:
    """(the held-out split, the label column, the class names) of a streamed dataset, from its metadata alone."""
    own = hub_holdout(cfg, list(dd))
    if not own:
        raise UserError(f"data.streaming={cfg.streaming}: {cfg.name} has no held-out split of its own (splits: "
                        f"{', '.join(dd)}) and a streamed Hub dataset is not carved; name one with "
                        "data.holdout_split=NAME, or set data.streaming=never")
    label_key, names = hub_columns(cfg, dd[cfg.split].features)
    if label_key and names is None:
        raise UserError(f"the label column {label_key} of {cfg.name} names no classes (no ClassLabel) and a stream "
                        "cannot count them; give data.class_names, or data.label_key='' for none")
    return own, label_key, names


class EncodedImages(DecodedOnAccess):
    """Images of a map-style ``datasets.Dataset`` whose image column holds the encoded files, decoded on access."""

    def __init__(self, ds, label_key: str, cfg: DataConfig) -> None:
        super().__init__(np.asarray(ds[label_key]) if label_key else np.full(len(ds), -1), cfg)
        self.ds, self.image_key, self.name = ds.select_columns([cfg.image_key]), cfg.image_key, cfg.name

    def __len__(self) -> int:
        return len(self.labels)

    def source(self, j: int) -> tuple[dict, str]:
        item = self.ds[j][self.image_key]
        return item, item.get("path") or f"{self.name} example {j}"


def _holdout(cfg: DataConfig, own: str, label_key: str) -> EncodedImages:
    """The first data.stream_holdout examples of the held-out split, streamed, their encoded bytes kept."""
    import datasets

    stream = _open(cfg, True, own)
    rows = list(islice(iter(stream), cfg.stream_holdout))
    if not rows:
        raise UserError(f"the {own} split of {cfg.name} is empty; name another with data.holdout_split")
    return EncodedImages(datasets.Dataset.from_list(rows, features=stream.features), label_key, cfg)


def load_hub_stream(cfg: DataConfig, random_access: bool = False) -> ImageData:
    """A streamed Hub dataset: its held-out images (:func:`_holdout`) and, as training set, a :class:`HubStream`
    (stage 1, the data summary) or with ``random_access`` the map-style training split decoded on access (the later
    stages: stage 2 encodes every training image, evaluation draws a seeded subset)."""
    dd = _open(cfg, True)
    own, label_key, names = _layout(cfg, dd)
    holdout = _holdout(cfg, own, label_key)
    train = EncodedImages(_open(cfg, False, cfg.split), label_key, cfg) if random_access else \
        HubStream(_open(cfg, True, cfg.split), label_key, cfg)
    how = f"the data's own {own} split, its first {len(holdout)} images; streamed"
    sig = f"streamed-{signature(cfg)}-{len(holdout)}"  # never shared with the decoded-up-front path's statistics
    info = {**Prepared({}, names, own).info(), "signature": sig, "cached": False}
    return ImageData(train, holdout, len(names or []), names, cfg.channels, cfg.image_size, how, info)  # type: ignore


class EmptyReader(WorkerUserError):
    """A reader (a process's DataLoader worker) whose part of the training split holds no example."""


START = {"epoch": 0, "block": 0, "state": None, "used": 0, "batches": 0}  # a reader's position before any example


class HubStream(IterableDataset):
    """The training split of a streamed Hub dataset as batches of (float images in [-1, 1], augmented; labels;
    (reader, its position after the batch)), made in DataLoader workers. The training loop calls :meth:`for_rank`
    with its rank, batch size and seed, hands every batch it takes to :meth:`take` (which records its reader's
    position) and saves :meth:`state_dict` in the checkpoint."""

    per_rank = True  # each rank has its own position: the checkpoint keeps every rank's

    def __init__(self, ds, label_key: str, cfg: DataConfig) -> None:
        self.ds, self.label_key, self.image_key, self.name = ds, label_key, cfg.image_key, cfg.name
        self.size, self.channels, self.on_corrupt = cfg.image_size, cfg.channels, cfg.on_corrupt
        self.background = ImageColor.getrgb(cfg.background)[:3]
        self.hflip, self.crop_scale = cfg.hflip, cfg.crop_scale
        splits = ds.info.splits or {}
        self.count = splits[ds.split].num_examples if ds.split in splits else None  # None: not in the metadata

    def for_rank(self, rank: int, world: int, batch_size: int, seed: int, workers: int) -> HubStream:
        """This rank's stream (its own part of the split), read by max(1, ``workers``) readers."""
        from datasets.distributed import split_dataset_by_node

        out = copy.copy(self)
        out.rank, out.world, out.batch_size, out.seed, out.readers = rank, world, batch_size, seed, max(1, workers)
        out.rank_ds = split_dataset_by_node(self.ds, rank, world)
        out.positions, out.taken, out.first = {}, 0, 0
        return out

    # ---------------------------------------------------------------- in the training process

    def take(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The loop took ``batch``: record its reader's position; the images and labels, for the step."""
        x, labels, (reader, at) = batch
        self.positions[int(reader)] = at
        self.taken += 1
        return x, labels

    def state_dict(self) -> dict[str, Any]:
        return {"positions": {str(r): p for r, p in self.positions.items()}, "taken": self.taken, "rank": self.rank,
                "world": self.world, "readers": self.readers, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, saved: dict[str, Any]) -> str:
        """Continue every reader of this rank where the checkpoint ``saved`` (every rank's state) left it; the
        DataLoader's worker 0 then plays the reader whose turn it was. Returns "" when the resume is exact; when the
        process count, reader count, batch size or seed changed, the stream starts over and the note says so."""
        ranks = saved.get("ranks", [])
        state = ranks[self.rank] if len(ranks) == self.world else None
        keys = ("world", "readers", "batch_size", "seed")
        if state is None or any(state[k] != getattr(self, k) for k in keys):
            was = ", ".join(f"{k} {state[k]} -> {getattr(self, k)}" for k in keys if state and state[k] !=
                            getattr(self, k)) or f"world {len(ranks)} -> {self.world}"
            return f"the data readers changed ({was}): the stream starts over, in another order than a run straight"
        self.positions = {int(r): p for r, p in state["positions"].items()}
        self.taken, self.first = state["taken"], state["taken"] % self.readers
        return ""

    def seek(self, batches: int) -> None:
        """A checkpoint without a position: the stream starts from its beginning."""

    # ---------------------------------------------------------------- in each DataLoader worker

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        yield from self._batches((worker + self.first) % self.readers)  # DataLoader asks workers in turn from 0

    def _batches(self, reader: int) -> Iterator[tuple]:
        """Reader ``reader``'s batches from its saved position on."""
        batches = (self.positions.get(reader) or START)["batches"]
        pixels: list[np.ndarray] = []
        labels: list[int] = []
        for example, at in self._examples(reader):
            item = example[self.image_key]
            where = (item.get("path") if isinstance(item, dict) else None) or f"an example of {self.name}"
            arr = decode_or_skip(item, where, self.size, self.channels, self.background, self.on_corrupt)
            if arr is None:
                continue
            pixels.append(arr)
            labels.append(int(example[self.label_key]) if self.label_key else -1)
            if len(pixels) == self.batch_size:
                x = augmented_floats(torch.from_numpy(np.stack(pixels)), self.hflip, self.crop_scale,
                                     [self.seed, self.rank, reader, batches])
                batches += 1
                yield x, torch.tensor(labels, dtype=torch.long), (reader, {**at, "batches": batches})
                pixels, labels = [], []

    def _examples(self, reader: int) -> Iterator[tuple[dict, dict]]:
        """Reader ``reader``'s examples, epoch after epoch, each with the position after it: blocks of SHUFFLE_BLOCK
        examples in a seeded order; a position inside a block re-reads the block from its start state."""
        from datasets.distributed import split_dataset_by_node

        pos = self.positions.get(reader) or START
        epoch, block, state, used = pos["epoch"], pos["block"], pos["state"], pos["used"]
        while True:
            stream = split_dataset_by_node(self.rank_ds, reader, self.readers)
            stream.set_epoch(epoch)
            if state is not None:
                stream.load_state_dict(state)
            seen = block > 0
            for rows in stream.iter(batch_size=SHUFFLE_BLOCK):
                after = stream.state_dict()
                n = len(rows[self.image_key])
                order = np.random.default_rng([self.seed, self.rank, reader, epoch, block]).permutation(n)
                for j in range(used, n):
                    at = {"epoch": epoch, "block": block, "state": state, "used": j + 1} if j + 1 < n else \
                        {"epoch": epoch, "block": block + 1, "state": after, "used": 0}
                    yield {k: v[order[j]] for k, v in rows.items()}, at
                block, state, used, seen = block + 1, after, 0, True
            if not seen:
                raise EmptyReader(f"reader {reader} of process {self.rank} has no example of {self.name}: it has "
                                  f"fewer examples than processes x data.num_workers ({self.world} x {self.readers}); "
                                  "lower data.num_workers")
            epoch, block, state, used = epoch + 1, 0, None, 0
