"""One image set in one extractor's feature space, as the sample-quality metrics need it, computed by every rank
on its own images and combined without moving images: moments for FID and per-split sums for the Inception Score
(all-reduced, ``pipeline.metrics.moments``), and the features of the first ``keep`` images, gathered on rank 0,
for what needs the points themselves (precision/recall/density/coverage, KID, bootstrap intervals).

Real sets' reductions are cached in a folder shared by runs (like clean-fid's custom statistics), one file per
provenance: which data, split, seed and N, which extractor (name, weights sha256, preprocessing protocol) and
how many features are kept. A file whose stored provenance is not the one asked for is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data import read_batches
from pipeline.distributed import gather_rows, shard_indices
from pipeline.io import atomic_savez
from pipeline.metrics.moments import Moments, ScoreSums, all_reduced, split_of

REFERENCE_ENV = "PIPELINE_REFERENCE_DIR"
CACHE_FORMAT = 1  # bump when what a cache file holds changes: older files then no longer match


@dataclass
class Reduced:
    """An image set's statistics. ``features`` and ``predicted`` are on rank 0 only (None elsewhere)."""

    n: int
    moments: Moments | None
    features: np.ndarray | None  # (min(keep, n), D) float32: images 0, 1, ... in index order
    scores: ScoreSums | None  # None when the extractor has no classifier head
    predicted: np.ndarray | None  # (n,) the classifier's class of every image, or None


def splits_for(n: int) -> int:
    """Inception-Score splits: the customary 10 once there are 100 images, else one."""
    return 10 if n >= 100 else 1


class PixelsOf(Dataset):
    """``pixels_of`` as a dataset of batches, for :func:`pipeline.data.read_batches` (in ``workers`` processes)."""

    def __init__(self, pixels_of: Callable[[list[int]], torch.Tensor], workers: int) -> None:
        self.pixels_of, self.workers = pixels_of, workers

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.pixels_of(indices)


def reduce_features(fabric, extractor, pixels_of: Callable[[list[int]], torch.Tensor], total: int,
                    batch_size: int, keep: int, desc: str = "features", workers: int = 0) -> Reduced:
    """The statistics of images ``0 .. total - 1``; this rank runs ``extractor`` on its share
    (``shard_indices``) only, reading each batch with ``pixels_of(indices)`` (uint8 (B, C, H, W)), in ``workers``
    DataLoader processes when it decodes files (streamed images; never a ``pixels_of`` that runs a model)."""
    from tqdm.auto import tqdm

    mine, splits = shard_indices(total, fabric.global_rank, fabric.world_size), splits_for(total)
    keep = min(keep, total)
    moments = scores = None
    kept, predicted = [], []
    chunks = [list(mine[start : start + batch_size]) for start in range(0, len(mine), batch_size)]
    batches = read_batches(PixelsOf(pixels_of, workers), chunks)
    for chunk, pixels in tqdm(zip(chunks, batches), total=len(chunks), desc=desc, leave=False,
                              disable=fabric.global_rank != 0):
        f, logits = extractor(fabric.to_device(pixels))
        f = f.float().cpu()  # (B, D)
        moments = moments or Moments.zeros(f.shape[1])
        moments.add(f)
        kept.append(f[torch.as_tensor(chunk) < keep].numpy())
        if logits is not None:
            scores = scores or ScoreSums.zeros(splits, logits.shape[1])
            scores.add(logits, split_of(np.asarray(chunk), total, splits))
            predicted.append(logits.argmax(1).cpu().numpy())
    shape = (moments.total.shape[0], scores.probs.shape[1] if scores else 0) if moments else None
    dim, classes = fabric.broadcast(shape, src=0)  # rank 0 has images whenever there are any
    moments = moments or Moments.zeros(dim)  # a rank with no images (total < world) adds zeros
    all_reduced(fabric, moments)
    if classes:
        scores = scores or ScoreSums.zeros(splits, classes)
        all_reduced(fabric, scores)
    feats = gather_rows(fabric, [np.concatenate(kept) if kept else np.zeros((0, dim), np.float32)], keep)
    preds = gather_rows(fabric, [np.concatenate(predicted) if predicted else np.zeros(0, np.int64)], total) \
        if classes else None
    return Reduced(total, moments, feats and feats[0], scores, preds and preds[0])


def reference_dir(configured: str) -> Path:
    """Where real sets' statistics are cached: ``evaluate.reference_dir``, else ``$PIPELINE_REFERENCE_DIR``,
    else ``~/.cache/pipeline/reference``."""
    return Path(configured or os.environ.get(REFERENCE_ENV) or "~/.cache/pipeline/reference").expanduser()


def cache_path(folder: Path, provenance: dict) -> Path:
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"{provenance['split']}-{provenance['extractor']}-{provenance['n']}-{key}.npz"


def save_reduced(path: Path, reduced: Reduced, provenance: dict) -> Path:
    arrays = {"n": np.asarray(reduced.n), "provenance": np.asarray(json.dumps(provenance, sort_keys=True)),
              "total": reduced.moments.total.numpy(), "outer": reduced.moments.outer.numpy(),
              "features": reduced.features}
    if reduced.scores is not None:
        arrays.update(count=reduced.scores.count.numpy(), probs=reduced.scores.probs.numpy(),
                      plogp=reduced.scores.plogp.numpy(), predicted=reduced.predicted)
    return atomic_savez(path, **arrays)


def load_reduced(path: Path, provenance: dict) -> Reduced | None:
    """The statistics in ``path`` if it holds those of ``provenance``, else None."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if json.loads(str(z["provenance"])) != json.loads(json.dumps(provenance, sort_keys=True)):
            return None
        t = {k: torch.from_numpy(z[k]) for k in ("total", "outer", "count", "probs", "plogp") if k in z.files}
        n = int(z["n"])
        scores = ScoreSums(t["count"], t["probs"], t["plogp"]) if "count" in t else None
        return Reduced(n, Moments(torch.tensor(float(n), dtype=torch.float64), t["total"], t["outer"]),
                       z["features"], scores, z["predicted"] if "predicted" in z.files else None)


def cached_reduction(fabric, folder: Path, provenance: dict, compute: Callable[[], Reduced], log=print) -> Reduced:
    """``compute()`` (a collective: every rank takes part), or rank 0 reads the file of the same provenance in
    ``folder``. Rank 0 decides for all, so the ranks never disagree about running the collective; it writes the
    file after computing (a folder it cannot write costs the cache, not the evaluation)."""
    provenance = {**provenance, "format": CACHE_FORMAT}
    path = cache_path(folder, provenance)
    found = None
    if fabric.global_rank == 0:
        try:
            found = load_reduced(path, provenance)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # a damaged file: computed again
            log(f"warning: {path} unreadable ({type(err).__name__}: {err}); recomputing it")
    if fabric.broadcast(found is not None, src=0):
        log(f"{provenance['extractor']}: statistics of {provenance['n']} {provenance['split']} images read from "
            f"{path}")
        return found if found is not None else Reduced(provenance["n"], None, None, None, None)
    reduced = compute()
    if fabric.global_rank == 0:
        try:
            save_reduced(path, reduced, provenance)
        except OSError as err:
            log(f"warning: reference statistics not cached ({err}); set evaluate.reference_dir to a writable folder")
    return reduced
