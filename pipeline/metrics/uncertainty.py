"""How sure a sample-quality number is: KID with its spread (unbiased at small N), and bootstrap intervals for
FID, precision and recall.

References:
    M. Binkowski, D. J. Sutherland, M. Arbel, A. Gretton. "Demystifying MMD GANs", ICLR 2018, arXiv:1801.01401
    (KID: the unbiased squared MMD with the cubic polynomial kernel, averaged over random subsets).
    B. Efron, R. Tibshirani. "An Introduction to the Bootstrap", 1993 (percentile intervals).

KID goes through torchmetrics' ``KernelInceptionDistance`` with the same identity feature module as FID
(``pipeline.metrics.fid``); its subsets are drawn from the global torch generator, so the draw is made
inside a forked RNG seeded by ``seed``: reproducible, and the caller's stream is untouched.

The FID interval resamples both feature sets with replacement, recomputes FID, and puts the estimate plus or
minus 1.96 of those values' standard deviation (resampled sets repeat rows, which biases FID upward, so their
percentiles would not even contain the estimate at small N). Precision and recall are shares of points
inside the other set's k-NN balls; their intervals resample those per-point indicators with the balls held
fixed, since repeated rows would shrink a k-NN radius to zero and so bias the balls themselves.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pipeline.metrics.fid import _as_float64, _PrecomputedFeatures, fid_from_features

__all__ = ["bootstrap_fid", "bootstrap_share", "kid_from_features"]


@torch.no_grad()
def kid_from_features(real, fake, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """KID (mean and standard deviation over ``subsets`` random subsets of ``min(subset_size, N / 2, M / 2)``
    rows; half the rows at most, so the subsets differ and the spread means something) of two (N, D) and (M, D)
    feature sets, as torchmetrics computes it (polynomial kernel, degree 3)."""
    real = _as_float64("real", real, min_rows=4)
    fake = _as_float64("fake", fake, min_rows=4)
    size = int(min(subset_size, len(real) // 2, len(fake) // 2))
    from torchmetrics.image.kid import KernelInceptionDistance  # lazy: heavy import, only needed here

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all extracted")
        metric = KernelInceptionDistance(feature=_PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=size, normalize=False, sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # compute() draws each subset with torch.randperm on the CPU generator
        mean, std = metric.compute()
    return {"mean": float(mean), "std": float(std)}


def _interval(values: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def fid_low_rank(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of few rows in many dimensions (N < D: 1,000 Inception features of 2,048), without a D x D matrix
    square root: with centred rows A (N x D) and B (M x D), the nonzero eigenvalues of S1 S2 = A'A B'B / c
    (c = (N - 1)(M - 1)) are those of G G' / c with G = A B' (N x M), so tr sqrt(S1 S2) = sum sqrt(eig(G G')) /
    sqrt(c): an N x N eigenproblem instead of D x D, about 30x faster at N = 1,000, D = 2,048."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    a, b = real - real.mean(0), fake - fake.mean(0)
    g = a @ b.T  # (N, M)
    gram = g @ g.T if len(a) <= len(b) else g.T @ g
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    mean_term = float(((real.mean(0) - fake.mean(0)) ** 2).sum())
    return mean_term + (a * a).sum() / (len(a) - 1) + (b * b).sum() / (len(b) - 1) - 2 * float(tr_sqrt)


def bootstrap_fid(real, fake, rounds: int = 100, seed: int = 0, level: float = 0.95,
                  estimate: float | None = None) -> list[float]:
    """A ``level`` interval of FID: the estimate (``estimate``, e.g. the FID of more images than ``real`` and
    ``fake`` hold; default: theirs) plus or minus z times the standard deviation of FID over
    ``rounds`` resamplings (with replacement) of both sets, the lower end clipped at 0. Not the percentile
    interval: a resampled set repeats about a third of its rows, which shrinks its spread and inflates FID, so
    the resampled values sit above the estimate (seen: a real floor of 2.03 with percentiles [2.89, 6.90] at
    N = 378); their spread is still a fair measure of the estimate's."""
    from statistics import NormalDist

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    rng = np.random.default_rng(seed)
    fid = fid_low_rank if real.shape[1] > min(len(real), len(fake)) else fid_from_features
    values = [fid(real[rng.integers(0, len(real), len(real))], fake[rng.integers(0, len(fake), len(fake))])
              for _ in range(rounds)]
    estimate = fid_from_features(real, fake) if estimate is None else estimate
    half = NormalDist().inv_cdf(0.5 + level / 2) * float(np.std(values))
    return [max(0.0, estimate - half), estimate + half]


def bootstrap_share(hits: np.ndarray, rounds: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """The ``level`` percentile interval of the share of True in ``hits`` over ``rounds`` resamplings."""
    hits = np.asarray(hits, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), (rounds, len(hits)))].mean(axis=1)  # (rounds,)
    return _interval(means, level)
