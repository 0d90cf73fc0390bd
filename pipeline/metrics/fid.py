"""FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016) from precomputed features / logits.

References:
    M. Heusel, H. Ramsauer, T. Unterthiner, B. Nessler, S. Hochreiter. "GANs Trained by a Two Time-Scale
    Update Rule Converge to a Local Nash Equilibrium", NeurIPS 2017, arXiv:1706.08500.
    T. Salimans, I. Goodfellow, W. Zaremba, V. Cheung, A. Radford, X. Chen. "Improved Techniques for Training
    GANs", NeurIPS 2016, arXiv:1606.03498.

Both go through torchmetrics' ``FrechetInceptionDistance`` / ``InceptionScore`` with an identity "feature
extractor" that carries a ``num_features`` attribute, so torchmetrics neither needs torch-fidelity nor runs
its dummy 299 x 299 forward; the features are extracted elsewhere (e.g. ``pipeline.metrics.features``).
What torchmetrics 1.9 does with such a custom module, and what follows here:

* ``FrechetInceptionDistance.update`` passes the input to the module unchanged (``normalize`` only picks
  the dtype of the dummy input, which ``num_features`` skips), casts the output to float64 for its running
  sums, and casts the final FID back to the dtype of the LAST features it saw. Features are therefore fed
  as float64 here, so nothing is rounded to float32 on the way out.
* Its covariance is the one-pass ``(sum x x^T - n mu mu^T) / (n - 1)``; in float64 that loses about
  ``1e-16 * (|mu| / std)^2`` relative accuracy, negligible for Inception features (``|mu| ~ std``).
* ``InceptionScore.update`` DOES apply ``normalize`` to custom modules (``(x * 255).byte()``), which would
  destroy logits: ``normalize=False`` is used. Its ``compute`` shuffles the rows with the global torch RNG
  before splitting; here that draw is made from a private generator state seeded by ``seed``, so the
  score is reproducible and the caller's RNG stream is untouched.
* Both metrics would all-reduce their states across processes when ``torch.distributed`` is initialised;
  ``sync_on_compute=False`` keeps these functions local to the calling process.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

__all__ = ["fid_from_features", "inception_score_from_logits"]

# Rows cast to float64 and fed to torchmetrics at once (bounds the float64 copy of a large feature set).
_UPDATE_ROWS = 4096


class _PrecomputedFeatures(nn.Module):
    """Identity feature extractor; ``num_features`` makes torchmetrics skip its dummy forward pass."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_float64(name: str, x: torch.Tensor | np.ndarray, min_rows: int) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, dtype=np.float64))
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} is a {type(x).__name__}: must be a torch.Tensor or numpy.ndarray")
    x = x.detach()
    if x.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: must be 2-D (num_samples, dim)")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: dim must be >= 1")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} has {x.shape[0]} rows: need at least {min_rows}")
    x = x.to(torch.float64)
    n_bad = int((~torch.isfinite(x)).sum())
    if n_bad:
        raise ValueError(f"{name} contains {n_bad} non-finite values (NaN/Inf): all values must be finite")
    return x


@torch.no_grad()
def fid_from_features(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> float:
    """Frechet Inception Distance (Heusel et al. 2017) between two sets of precomputed features.

    ``FID = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` with the means and unbiased covariances of
    the (N, D) real and (M, D) fake features, computed by torchmetrics in float64 on the device of ``real``.

    Raises:
        ValueError: an input is not 2-D, has fewer than 2 rows or non-finite values, or the dims differ.
    """
    real = _as_float64("real", real, min_rows=2)
    fake = _as_float64("fake", fake, min_rows=2).to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature dimensions differ: real has D={real.shape[1]}, fake has D={fake.shape[1]}; "
            f"both sets must have the same D"
        )
    from torchmetrics.image.fid import FrechetInceptionDistance  # lazy: heavy import, only needed here

    metric = FrechetInceptionDistance(
        feature=_PrecomputedFeatures(real.shape[1]), normalize=False, sync_on_compute=False
    ).to(real.device)
    for features, is_real in ((real, True), (fake, False)):
        for rows in features.split(_UPDATE_ROWS):  # (<=_UPDATE_ROWS, D) float64 blocks
            metric.update(rows, real=is_real)
    return float(metric.compute())


@torch.no_grad()
def inception_score_from_logits(
    logits: torch.Tensor | np.ndarray, splits: int = 10, seed: int = 0
) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) of (N, C) classifier logits: ``exp(E_x KL(p(y|x) || p(y)))``.

    The rows are shuffled (deterministically, from ``seed``) and cut into ``splits`` parts with
    ``torch.chunk`` (parts of ceil(N / splits) rows, the last one smaller); the score of each part uses that
    part's marginal p(y). Returns ``(mean, std)`` over the parts, in float64. The std is torchmetrics'
    unbiased one (ddof=1), i.e. sqrt(splits / (splits - 1)) times the ``np.std`` of the original code;
    with ``splits=1`` it is reported as 0.0.

    Raises:
        ValueError: logits not 2-D or non-finite, splits < 1, or N too small to make ``splits`` parts.
    """
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits={splits!r}: must be an integer >= 1")
    splits = int(splits)
    logits = _as_float64("logits", logits, min_rows=splits)
    n = logits.shape[0]
    parts = math.ceil(n / math.ceil(n / splits))  # number of chunks torch.chunk actually makes
    if parts != splits:
        raise ValueError(
            f"splits={splits} with N={n} logits: torch.chunk would make only {parts} parts of "
            f"{math.ceil(n / splits)} rows; use an N that is a multiple of splits or a larger N"
        )
    from torchmetrics.image.inception import InceptionScore  # lazy: heavy import, only needed here

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Metric `InceptionScore` will save all extracted features")
        metric = InceptionScore(
            feature=_PrecomputedFeatures(logits.shape[1]),
            splits=splits,
            normalize=False,
            sync_on_compute=False,
        ).to(logits.device)
    metric.update(logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # compute() draws torch.randperm(N) on the CPU generator
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # std of a single split
        mean, std = metric.compute()
    return float(mean), (0.0 if splits == 1 else float(std))
