"""Code grids of a dataset, extracted once with the trained stage-1 model and stored in the run folder.

Layout of ``RUN/codes/``::

    manifest.json                     stage-1 checkpoint hash, grids, codebook sizes, classes, shard list
    {split}-{level}-{shard:05d}.npy   (n, h, w) int16/int32 code grids, memory-mapped on load
    {split}-labels-{shard:05d}.npy    (n,) int64 labels (-1 where the data has none)

The extraction is reused while the stage-1 checkpoint's bytes are unchanged (sha256 in the manifest) and
redone when it changes. Shards keep datasets far larger than RAM workable: nothing is loaded whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data import ImageSet, to_float
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


@torch.no_grad()
def _encode_split(model, images: ImageSet, batch_size: int, device) -> tuple[list[np.ndarray], np.ndarray]:
    from tqdm.auto import tqdm

    out: list[list[np.ndarray]] = [[] for _ in range(model.levels)]
    for start in tqdm(range(0, len(images), batch_size), desc="extracting codes", leave=False):
        pixels, _ = images.__getitems__(list(range(start, min(start + batch_size, len(images)))))
        for level, codes in enumerate(model.encode(to_float(pixels.to(device)))):
            out[level].append(codes.cpu().numpy())
    return [np.concatenate(o) for o in out], images.labels.numpy()


def extract_codes(model, stage1_ckpt: Path, train: ImageSet, holdout: ImageSet, folder: Path,
                  class_names: list[str] | None, level_names: list[str], image_size: int, batch_size: int = 256,
                  shard_size: int = 100_000, device="cpu", log=print) -> dict:
    """Encode both splits (or reuse an extraction made with the same stage-1 checkpoint); returns the manifest."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    sha = file_sha256(stage1_ckpt)
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("stage1_sha256") == sha:
            log(f"codes: reusing {folder} (stage-1 checkpoint unchanged)")
            return manifest
        log(f"codes: stage-1 checkpoint changed since the last extraction; extracting again into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    k = model.cfg.codebook_size
    dtype = np.int16 if k <= np.iinfo(np.int16).max else np.int32
    manifest = {
        "stage1_checkpoint": str(stage1_ckpt), "stage1_sha256": sha, "levels": level_names,
        "grids": [list(g) for g in model.grid_shapes(image_size)], "num_codes": k,
        "num_classes": len(class_names or []), "class_names": class_names, "splits": {},
    }
    for split, images in (("train", train), ("holdout", holdout)):
        codes, labels = _encode_split(model, images, batch_size, device)
        shards = []
        for i, start in enumerate(range(0, len(labels), shard_size)):
            entry = {"n": int(min(shard_size, len(labels) - start))}
            for name, level_codes in zip(level_names, codes):
                entry[name] = f"{split}-{name}-{i:05d}.npy"
                atomic_save_npy(folder / entry[name], level_codes[start : start + shard_size].astype(dtype))
            entry["labels"] = f"{split}-labels-{i:05d}.npy"
            atomic_save_npy(folder / entry["labels"], labels[start : start + shard_size].astype(np.int64))
            shards.append(entry)
        manifest["splits"][split] = {"n": int(len(labels)), "shards": shards}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))  # written last: marks a complete extraction
    log(f"codes: {manifest['splits']['train']['n']} train / {manifest['splits']['holdout']['n']} held-out grids "
        f"{manifest['grids']} in {folder}")
    return manifest




def load_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise UserError(f"no code extraction at {folder}")
    return json.loads(path.read_text())
