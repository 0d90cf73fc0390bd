"""FID and Inception Score from sums that add across processes, so every rank scores only its own images and one
``all_reduce`` combines them: the cost per rank of a 50,000-image FID does not grow with the process count's N.

FID (Heusel et al. 2017, arXiv:1706.08500) needs each set's mean and covariance only: count, sum and sum of
outer products (float64, torchmetrics' one-pass ``(sum x x^T - n mu mu^T) / (n - 1)``), then torchmetrics'
own ``_compute_fid``, so the value is ``fid_from_features``' up to the rounding of another summation order.

The Inception Score (Salimans et al. 2016, arXiv:1606.03498) of split s is ``exp(E_x KL(p(y|x) || p_s(y)))``;
with ``P_s = sum_x p(y|x)`` and ``H_s = sum_x sum_y p log p`` over the split's n_s images it is
``exp((H_s - P_s . log(P_s / n_s)) / n_s)``: per-split sums again. Image i of N belongs to split
``s`` with ``floor(s N / S) <= i < floor((s + 1) N / S)``: contiguous parts in sample order, as the authors'
code cuts them (not torchmetrics' random shuffle), so the split of an image does not depend on the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Moments:
    """Count, sum (D,) and sum of outer products (D, D) of feature rows, float64."""

    n: torch.Tensor  # () float64, so all three all-reduce alike
    total: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def zeros(cls, dim: int) -> Moments:
        f64 = torch.float64
        return cls(torch.zeros((), dtype=f64), torch.zeros(dim, dtype=f64), torch.zeros(dim, dim, dtype=f64))

    def add(self, features: torch.Tensor) -> None:
        x = features.detach().cpu().to(torch.float64)  # (B, D)
        self.n += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x  # (D, B) @ (B, D)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.n
        return mean, (self.outer - self.n * torch.outer(mean, mean)) / (self.n - 1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.n, self.total, self.outer]


def fid_from_moments(real: Moments, fake: Moments) -> float:
    """FID of two sets given by their moments (each at least 2 rows), as ``fid_from_features`` computes it."""
    from torchmetrics.image.fid import _compute_fid  # lazy: heavy import

    if real.n < 2 or fake.n < 2:
        raise ValueError(f"FID needs at least 2 rows per set, got {int(real.n)} and {int(fake.n)}")
    (mu1, s1), (mu2, s2) = real.mean_cov(), fake.mean_cov()
    return float(_compute_fid(mu1, s1, mu2, s2))


def split_of(indices: np.ndarray, total: int, splits: int) -> np.ndarray:
    """The Inception-Score split of images ``indices`` of ``total``: contiguous parts of floor(s N / S)."""
    bounds = np.arange(splits + 1) * total // splits  # (S + 1,)
    return np.searchsorted(bounds, np.asarray(indices), side="right") - 1


@dataclass
class ScoreSums:
    """Per Inception-Score split: image count (S,), sum of class probabilities (S, C), sum of p log p (S,)."""

    count: torch.Tensor
    probs: torch.Tensor
    plogp: torch.Tensor

    @classmethod
    def zeros(cls, splits: int, classes: int) -> ScoreSums:
        f64 = torch.float64
        return cls(torch.zeros(splits, dtype=f64), torch.zeros(splits, classes, dtype=f64),
                   torch.zeros(splits, dtype=f64))

    def add(self, logits: torch.Tensor, split: np.ndarray) -> None:
        p = torch.softmax(logits.detach().cpu().to(torch.float64), dim=1)  # (B, C)
        s = torch.as_tensor(split, dtype=torch.long)
        self.count.index_add_(0, s, torch.ones(len(s), dtype=torch.float64))
        self.probs.index_add_(0, s, p)
        self.plogp.index_add_(0, s, torch.special.xlogy(p, p).sum(1))

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.probs, self.plogp]


def inception_score_from_sums(sums: ScoreSums) -> tuple[float, float]:
    """(mean, std) over the splits of ``exp(E KL(p(y|x) || p(y)))``; std with ddof 1, 0.0 for one split."""
    marginal = sums.probs / sums.count[:, None]  # (S, C)
    kl = (sums.plogp - torch.special.xlogy(sums.probs, marginal).sum(1)) / sums.count  # (S,)
    scores = torch.exp(kl)
    return float(scores.mean()), (float(scores.std()) if len(scores) > 1 else 0.0)


def all_reduced(fabric, stats: Moments | ScoreSums) -> None:
    """Sum ``stats`` over the ranks, in place."""
    if fabric.world_size == 1:
        return
    for t in stats.tensors():
        t.copy_(fabric.all_reduce(fabric.to_device(t), reduce_op="sum").cpu())
