"""Code grids of a dataset, extracted once with the trained stage-1 model and stored in the run folder.

Layout of ``RUN/codes/``::

    manifest.json                     stage-1 checkpoint hash, grids, codebook sizes, classes, shard list
    {split}-{level}-{shard:05d}.npy   (n, h, w) int16/int32 code grids, memory-mapped on load
    {split}-labels-{shard:05d}.npy    (n,) int64 labels (-1 where the data has none)

Shards are numbered in dataset order; with several processes each rank writes the shards of its own contiguous
range of images (``extraction_plan``; the manifest records each shard's ``rank`` and ``start``).

The extraction is reused while the stage-1 checkpoint's bytes are unchanged (sha256 in the manifest) and
redone when it changes. Shards keep datasets far larger than RAM workable: nothing is loaded whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data import ImageSet, ShiftedCopies, read_batches, to_float
from pipeline.distributed import ONE_PROCESS, on_every_rank, rank_zero_result
from pipeline.io import UserError, atomic_save_npy, atomic_write_text


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class CodeInfo:
    grids: list[tuple[int, int]]  # per level, top first
    num_codes: int
    num_classes: int
    levels: list[str]  # names, top first


class CodeSet(Dataset):
    """Code grids of one split: item -> (codes per level (h, w) long, label). Batched via ``__getitems__``."""

    def __init__(self, folder: Path, split: str, manifest: dict) -> None:
        self.levels = manifest["levels"]
        shards = manifest["splits"][split]["shards"]
        self.codes = [[np.load(folder / s[name], mmap_mode="r") for s in shards] for name in self.levels]
        self.labels = [np.load(folder / s["labels"], mmap_mode="r") for s in shards]
        sizes = [len(x) for x in self.labels]
        self.offsets = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitems__(self, indices: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1  # which shard holds each index
        local = idx - self.offsets[shard]
        out_codes = [np.empty((len(idx),) + level[0].shape[1:], dtype=np.int64) for level in self.codes]
        labels = np.empty(len(idx), dtype=np.int64)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            for out, level in zip(out_codes, self.codes):
                out[sel] = level[s][local[sel]]
            labels[sel] = self.labels[s][local[sel]]
        return [torch.from_numpy(c) for c in out_codes], torch.from_numpy(labels)

    def __getitem__(self, index: int):
        codes, labels = self.__getitems__([index])
        return [c[0] for c in codes], labels[0]


def extraction_plan(n: int, world: int, batch_size: int, shard_size: int) -> list[dict]:
    """The shard files of one split of ``n`` images, in dataset order: ``{"rank", "start", "n"}`` each.

    Rank r encodes one contiguous range of whole batches (the batches a single process would make), split into
    files of at most ``shard_size`` grids. Contiguous ranges keep the shard list in dataset order, so the CodeSet
    index of an image (and its label) does not depend on the process count; whole batches give every rank the
    arithmetic of a 1-process extraction (the nearest-code argmin sees the same batch shapes, so no tie flips)."""
    batches = -(-n // batch_size)
    plan = []
    for rank in range(world):
        lo = min(n, batches * rank // world * batch_size)
        hi = min(n, batches * (rank + 1) // world * batch_size)
        plan += [{"rank": rank, "start": s, "n": min(shard_size, hi - s)} for s in range(lo, hi, shard_size)]
    return plan


def _shard_names(split: str, index: int, level_names: list[str]) -> dict[str, str]:
    names = {name: f"{split}-{name}-{index:05d}.npy" for name in level_names}
    return {**names, "labels": f"{split}-labels-{index:05d}.npy"}


@torch.no_grad()
def _encode_range(model, images: ImageSet, start: int, stop: int, batch_size: int, device, dtype,
                  progress: bool) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """(codes per level, labels) of images ``start .. stop``, batch by batch (``start`` is a batch boundary)."""
    from tqdm.auto import tqdm

    batches = [list(range(lo, min(lo + batch_size, stop))) for lo in range(start, stop, batch_size)]
    for pixels, labels in tqdm(read_batches(images, batches), total=len(batches), desc="extracting codes",
                               leave=False, disable=not progress):
        codes = model.encode(to_float(pixels.to(device)))
        yield [c.cpu().numpy().astype(dtype) for c in codes], labels.numpy()


def _regroup(blocks: Iterator[tuple[list[np.ndarray], np.ndarray]],
             sizes: list[int]) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """The rows of consecutive ``blocks`` regrouped into consecutive groups of ``sizes`` rows (batches -> files)."""
    held: list[tuple[list[np.ndarray], np.ndarray]] = []
    for size in sizes:
        while sum(len(b[1]) for b in held) < size:
            held.append(next(blocks))
        codes = [np.concatenate(level) for level in zip(*(b[0] for b in held))]
        labels = np.concatenate([b[1] for b in held])
        rest = ([c[size:] for c in codes], labels[size:])
        held = [rest] if len(rest[1]) else []
        yield [c[:size] for c in codes], labels[:size]


def _extract_mine(model, splits: dict[str, ImageSet], folder: Path, level_names: list[str], rank: int, world: int,
                  batch_size: int, shard_size: int, device, dtype) -> None:
    """Encode and write this rank's shard files of every split (``extraction_plan``)."""
    for split, images in splits.items():
        plan = extraction_plan(len(images), world, batch_size, shard_size)
        mine = [(i, s) for i, s in enumerate(plan) if s["rank"] == rank]
        if not mine:
            continue
        stop = mine[-1][1]["start"] + mine[-1][1]["n"]
        blocks = _encode_range(model, images, mine[0][1]["start"], stop, batch_size, device, dtype, rank == 0)
        for (index, _), (codes, labels) in zip(mine, _regroup(blocks, [s["n"] for _, s in mine])):
            names = _shard_names(split, index, level_names)
            for name, level_codes in zip(level_names, codes):
                atomic_save_npy(folder / names[name], level_codes)
            atomic_save_npy(folder / names["labels"], labels.astype(np.int64))


NO_COPIES = {"copies": 0, "shift": 0}  # the train split's shifted copies (extract.copies) when there are none


def _reusable_or_prepare(folder: Path, sha: str, copies: dict, log) -> dict | None:
    """The earlier extraction's manifest when it was made with this stage-1 checkpoint and the same shifted copies;
    else None, with the stale manifest and shard files removed first (a half-written extraction must never pass for
    a complete one)."""
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("stage1_sha256") == sha and manifest.get("train_copies", NO_COPIES) == copies:
            log(f"codes: reusing {folder} (stage-1 checkpoint and extract.copies unchanged)")
            return manifest
        changed = "stage-1 checkpoint" if manifest.get("stage1_sha256") != sha else "extract.copies/shift"
        log(f"codes: {changed} changed since the last extraction; extracting again into {folder}")
        manifest_path.unlink()
        for stale in folder.glob("*-*-[0-9][0-9][0-9][0-9][0-9].npy"):
            stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return None


def extract_codes(model, stage1_ckpt: Path, train: ImageSet, holdout: ImageSet, folder: Path,
                  class_names: list[str] | None, level_names: list[str], image_size: int, batch_size: int = 256,
                  shard_size: int = 100_000, device="cpu", log=print, fabric=ONE_PROCESS) -> dict:
    """Encode both splits (or reuse an extraction made with the same stage-1 checkpoint and the same shifted
    copies when ``train`` is a :class:`ShiftedCopies`, recorded in the manifest); returns the manifest.

    With several processes (``fabric``) every rank encodes and writes its own part of each split
    (``extraction_plan``); rank 0 decides on reuse, and writes ``manifest.json`` once every rank's files exist.
    A failure on any rank stops every rank with its reason."""
    folder = Path(folder)
    sha = file_sha256(stage1_ckpt)
    copies = train.record() if isinstance(train, ShiftedCopies) else NO_COPIES
    reused = rank_zero_result(fabric, lambda: _reusable_or_prepare(folder, sha, copies, log))
    if reused is not None:
        return reused
    k = model.cfg.codebook_size
    dtype = np.int16 if k <= np.iinfo(np.int16).max else np.int32
    splits = {"train": train, "holdout": holdout}
    on_every_rank(fabric, lambda: _extract_mine(model, splits, folder, level_names, fabric.global_rank,
                                                fabric.world_size, batch_size, shard_size, device, dtype))

    def write_manifest() -> dict:
        manifest = {
            "stage1_checkpoint": str(stage1_ckpt), "stage1_sha256": sha, "levels": level_names,
            "grids": [list(g) for g in model.grid_shapes(image_size)], "num_codes": k,
            "num_classes": len(class_names or []), "class_names": class_names, "splits": {},
            "train_copies": copies,
        }
        for split, images in splits.items():
            shards = [{**s, **_shard_names(split, i, level_names)}
                      for i, s in enumerate(extraction_plan(len(images), fabric.world_size, batch_size, shard_size))]
            missing = [s["labels"] for s in shards if not (folder / s["labels"]).is_file()]
            if missing:
                raise UserError(f"codes: shard files {missing} were not written to {folder} (is it on a disk every "
                                "process sees?); run stage 2 again")
            manifest["splits"][split] = {"n": len(images), "shards": shards}
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))  # last: a complete extraction
        extra = f" ({len(train.images)} images + {train.copies} shifted copies of each)" \
            if isinstance(train, ShiftedCopies) else ""
        log(f"codes: {len(train)} train{extra} / {len(holdout)} held-out grids {manifest['grids']} in {folder}"
            + (f", written by {fabric.world_size} processes" if fabric.world_size > 1 else ""))
        return manifest

    return rank_zero_result(fabric, write_manifest)


def load_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise UserError(f"no code extraction at {folder}")
    return json.loads(path.read_text())
