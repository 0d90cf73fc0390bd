"""Training objective and held-out likelihood of the priors: what each level's prior is conditioned on, the
summed NLL of a batch, and the held-out NLL in bits per code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.codes import CodeSet
from pipeline.distributed import shard_batches
from pipeline.priors.base import Prior

LN2 = math.log(2.0)


def prior_conditions(codes: list[torch.Tensor], labels: torch.Tensor, level: int, num_classes: int):
    """(target codes, labels or None, conditioning codes or None) for the prior of ``level`` (0 = top)."""
    target = codes[level]
    cond = codes[level - 1] if level > 0 else None
    return target, (labels if num_classes > 0 else None), cond


def nll_sum(prior: Prior, target: torch.Tensor, labels, cond) -> torch.Tensor:
    """Summed negative log-likelihood (nats) of the target codes."""
    logits = prior(target, labels, cond)  # (B, T, K)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum")


@torch.no_grad()
def heldout_nll_bits(fabric, prior: Prior, holdout: CodeSet, level: int, num_classes: int, batch_size: int = 256,
                     shuffle_cond: bool = False) -> float:
    """Held-out NLL in bits per code, sharded over ranks and summed. ``shuffle_cond`` pairs every grid with
    the conditioning codes of another image (a check that the conditioning is used)."""
    rank, world = fabric.global_rank, fabric.world_size
    total = torch.zeros((), dtype=torch.float64, device=fabric.device)
    count = torch.zeros((), dtype=torch.float64, device=fabric.device)
    for idx, real in shard_batches(len(holdout), rank, world, batch_size):
        codes, labels = fabric.to_device(holdout.__getitems__(idx))
        target, labels, cond = prior_conditions(codes, labels, level, num_classes)
        if shuffle_cond and cond is not None:
            cond = cond.roll(1, dims=0)
        nll = nll_sum(prior, target, labels, cond).double()  # on every rank equally often (FSDP)
        if real:
            total += nll
            count += target.numel()
    if world > 1:
        total, count = fabric.all_reduce(total, reduce_op="sum"), fabric.all_reduce(count, reduce_op="sum")
    return float(total / count / LN2)
