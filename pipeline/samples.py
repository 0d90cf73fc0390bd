"""Sample sets on disk: one shard per sampling process and a manifest, so that no process ever gathers or holds
every image (50,000 ImageNet samples are 10 GB at 256 px).

    samples/manifest.json                   count, shard names, stamp, settings, levels; written last, by rank 0
    samples/samples.npz                     the one shard of a 1-process run (the file users and older runs know)
    samples/shard-00000-of-00002.npz ...    shard r of a W-process run: samples r, r + W, r + 2W, ...

A shard (an uncompressed .npz, so rows are read from a memory map) holds ``images`` (n, H, W, C) uint8,
``labels`` (n,), ``codes_<level>`` and the ``stamp`` of its sampling.
The manifest is what makes shards one sample set: a shard whose stamp differs from the manifest's (a later,
interrupted sampling overwrote it) is refused, never mixed with another sampling's images. A folder with only
samples.npz (written before manifests existed) reads as a set of one shard.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.io import UserError, atomic_savez_stored, atomic_write_text

MANIFEST = "manifest.json"
SINGLE = "samples.npz"


def shard_name(rank: int, world: int) -> str:
    return SINGLE if world == 1 else f"shard-{rank:05d}-of-{world:05d}.npz"


def write_shard(folder: Path, rank: int, world: int, stamp: str, images: np.ndarray, labels: np.ndarray,
                codes: dict[str, np.ndarray], settings: dict) -> Path:
    """Shard ``rank`` of ``world``: the samples ``rank, rank + world, ...`` of one sampling (atomically)."""
    arrays = {f"codes_{name}": c for name, c in codes.items()}
    return atomic_savez_stored(Path(folder) / shard_name(rank, world), images=images, labels=labels,
                               stamp=np.asarray(stamp), settings=np.asarray(json.dumps(settings)), **arrays)


def manifest_of(count: int, world: int, stamp: str, settings: dict, levels: list[str]) -> dict:
    return {"count": int(count), "world": int(world), "shards": [shard_name(r, world) for r in range(world)],
            "stamp": stamp, "settings": settings, "levels": list(levels)}


def commit(folder: Path, manifest: dict) -> Path:
    """Write the manifest (the moment the new shards become the sample set), then remove the shards of earlier
    samplings that it does not list."""
    path = atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=1))
    for old in [*Path(folder).glob("shard-*-of-*.npz"), Path(folder) / SINGLE]:
        if old.name not in manifest["shards"] and old.exists():
            old.unlink()
    return path


def stored_array(path: Path, key: str) -> np.ndarray | None:
    """Array ``key`` of an uncompressed .npz as a read-only memory map, so reading rows reads only those rows;
    None when it is compressed (samples.npz written before shards were stored) or empty."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", fh.read(30)[26:30])  # the local file header's last fields
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
    if dtype.hasobject or not np.prod(shape):
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


@dataclass(frozen=True)
class SampleSet:
    """The samples of one sampling: ``take`` reads only the rows asked for, from memory-mapped shards, so a rank
    can stream its share of 50,000 images batch by batch."""

    folder: Path
    manifest: dict

    def __len__(self) -> int:
        return self.manifest["count"]

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    def _shard(self, s: int) -> np.lib.npyio.NpzFile:
        path = self.folder / self.manifest["shards"][s]
        world, count = self.manifest["world"], self.manifest["count"]
        try:
            z = np.load(path, allow_pickle=False)
            stamp = str(z["stamp"]) if "stamp" in z.files else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise UserError(f"{path} of the sample set in {self.folder} is missing or damaged "
                            f"({type(err).__name__}); run the sample stage again") from None
        if stamp != self.manifest["stamp"] or len(z["labels"]) != len(range(s, count, world)):
            z.close()
            raise UserError(f"{path} is not part of the sample set of {self.folder / MANIFEST} (an interrupted "
                            "sampling?); run the sample stage again")
        return z

    def take(self, indices: Sequence[int], keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows ``indices`` (in that order) of ``keys`` (default: images, labels and every level's codes)."""
        world = self.manifest["world"]
        keys = list(keys or ["images", "labels", *(f"codes_{n}" for n in self.manifest["levels"])])
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample indices must be in [0, {len(self)})")
        out: dict[str, np.ndarray] = {}
        for s in np.unique(idx % world):
            where = np.flatnonzero(idx % world == s)
            with self._shard(int(s)) as z:
                for key in keys:
                    stored = stored_array(self.folder / self.manifest["shards"][s], key)
                    part = np.asarray((z[key] if stored is None else stored)[idx[where] // world])
                    if key not in out:
                        out[key] = np.empty((len(idx),) + part.shape[1:], part.dtype)
                    out[key][where] = part
        for key in keys:  # no rows asked for: empty arrays of the right shape from shard 0
            if key not in out:
                with self._shard(0) as z:
                    out[key] = z[key][:0]
        return out

    def check(self) -> None:
        """Every shard is there, of this sampling, with its number of rows (reads the labels only)."""
        for s in range(self.manifest["world"]):
            self._shard(s).close()

    def labels(self) -> np.ndarray:
        """Every sample's label, in sample order (a few bytes per image)."""
        return self.take(range(len(self)), ["labels"])["labels"]


def load_sample_set(folder: Path) -> SampleSet | None:
    """The sample set in ``folder``, or None when there is none."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return SampleSet(folder, json.loads((folder / MANIFEST).read_text()))
    if not (folder / SINGLE).is_file():
        return None
    with np.load(folder / SINGLE, allow_pickle=False) as z:  # written before manifests: one shard, no stamp
        settings = json.loads(str(z["settings"])) if "settings" in z.files else {}
        levels = [k[len("codes_"):] for k in z.files if k.startswith("codes_")]
        count = len(z["labels"])
    return SampleSet(folder, {"count": count, "world": 1, "shards": [SINGLE], "stamp": None, "settings": settings,
                              "levels": levels})
