"""How well stage 1 keeps the images: held-out MSE and PSNR, and how its codebooks are used (per-level code
histograms, usage and perplexity), over one sharded pass of the held-out set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data import ImageSet, to_float
from pipeline.distributed import shard_batches
from pipeline.vqvae import level_names


@dataclass
class ReconstructionStats:
    metrics: dict[str, float]  # mse, psnr, usage_<level>, perplexity_<level>
    histograms: dict[str, np.ndarray]  # per level, top first: (codebook_size,) counts over the held-out pass


@torch.no_grad()
def reconstruction_stats(fabric, model, holdout: ImageSet, batch_size: int = 250) -> ReconstructionStats:
    """Held-out MSE (on the [-1, 1] scale), PSNR (peak-to-peak 2), and per level (top first) the code histogram of
    the pass, the share of codes used and the histogram's perplexity. Sharded over ranks, then summed."""
    rank, world = fabric.global_rank, fabric.world_size
    inner: Any = model.module if hasattr(model, "module") else model
    levels, k = inner.levels, inner.cfg.codebook_size
    sq_err = torch.zeros((), device=fabric.device, dtype=torch.float64)
    count = torch.zeros((), device=fabric.device, dtype=torch.float64)
    hist = torch.zeros(levels, k, device=fabric.device, dtype=torch.float64)
    for idx, real in shard_batches(len(holdout), rank, world, batch_size):
        pixels, _ = holdout.__getitems__(idx)
        x = to_float(fabric.to_device(pixels))
        out = model(x)  # every rank runs as many forward passes (FSDP gathers the weights in each)
        if not real:
            continue
        sq_err += (out.reconstruction.float() - x).pow(2).sum().double()
        count += x.numel()
        for level, codes in enumerate(out.codes):
            hist[level] += torch.bincount(codes.flatten(), minlength=k).double()
    if world > 1:
        sq_err, count, hist = (fabric.all_reduce(t, reduce_op="sum") for t in (sq_err, count, hist))
    mse = float(sq_err / count)
    probs = hist / hist.sum(1, keepdim=True)
    perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum(1))
    names = level_names(levels)
    metrics = {"mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}
    for i, name in enumerate(names):
        metrics[f"usage_{name}"] = float((hist[i] > 0).double().mean())
        metrics[f"perplexity_{name}"] = float(perplexity[i])
    histograms = {name: hist[i].cpu().numpy().astype(np.int64) for i, name in enumerate(names)}
    return ReconstructionStats(metrics, histograms)
