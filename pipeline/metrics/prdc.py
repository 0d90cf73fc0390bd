"""Improved precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020).

References:
    T. Kynkaanniemi, T. Karras, S. Laine, J. Lehtinen, T. Aila. "Improved Precision and Recall Metric for
    Assessing Generative Models", NeurIPS 2019, arXiv:1904.06991.
    M. F. Naeem, S. J. Oh, Y. Uh, Y. Choi, J. Yoo. "Reliable Fidelity and Diversity Metrics for Generative
    Models", ICML 2020, arXiv:2002.09797.

With real features X_1..X_N, fake features Y_1..Y_M and r_i / s_j the distance from X_i / Y_j to its k-th
nearest neighbour within its own set (the point itself excluded):

    precision = 1/M sum_j 1[exists i: d(Y_j, X_i) <= r_i]
    recall    = 1/N sum_i 1[exists j: d(X_i, Y_j) <= s_j]
    density   = 1/(kM) sum_j sum_i 1[d(Y_j, X_i) <= r_i]
    coverage  = 1/N sum_i 1[min_j d(X_i, Y_j) <= r_i]

Membership uses ``<=`` as in the papers (the ``prdc`` package of Naeem et al. uses ``<``; the two only differ
on exact ties, which are common for quantised or duplicated features).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["precision_recall"]

# Bytes allowed for one (chunk, n_columns) block of squared distances when chunk_size is not given.
_DEFAULT_BLOCK_BYTES = 256 * 2**20


def _as_tensor(name: str, features: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        return features.detach()
    if isinstance(features, np.ndarray):
        if not features.flags.writeable:  # torch.from_numpy warns on read-only arrays
            features = features.copy()
        return torch.from_numpy(features)
    raise TypeError(f"{name} is a {type(features).__name__}: must be a torch.Tensor or numpy.ndarray")


def _check_features(name: str, x: torch.Tensor, k: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: must be 2-D (num_points, feature_dim)")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: feature_dim must be >= 1")
    if x.shape[0] < k + 1:
        raise ValueError(
            f"{name} has {x.shape[0]} points: need at least k+1 = {k + 1} (k={k}) so that every point has "
            f"k neighbours other than itself"
        )
    if x.is_floating_point():
        n_bad = int((~torch.isfinite(x)).sum())
        if n_bad:
            raise ValueError(f"{name} contains {n_bad} non-finite values (NaN/Inf): all features must be finite")


@contextlib.contextmanager
def _full_precision_matmul(device: torch.device) -> Iterator[None]:
    """Disable TF32 matmuls on CUDA for the duration (they would round distances to ~1e-3 relative)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) = |a|^2 + |b|^2 - 2 a.b, clamped at 0, built in place."""
    d2 = a @ b.T  # (A, D) @ (D, B) -> (A, B)
    d2.mul_(-2).add_(a_sq[:, None]).add_(b_sq[None, :])  # a_sq: (A,) -> (A, 1); b_sq: (B,) -> (1, B)
    return d2.clamp_(min=0)


def _merge_smallest(best: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest of each row of best (R, k) and candidates (R, c), unsorted, (R, k)."""
    return torch.topk(torch.cat([best, candidates], dim=1), k, dim=1, largest=False, sorted=False).values


def _kth_nn_sq_radii(x: torch.Tensor, x_sq: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance from each row of x to its k-th nearest other row of x, (N,).

    The distance matrix is symmetric, so only the blocks on and above the diagonal are computed: the block of
    rows [i0, i1) against columns [i0, N) gives its rows their candidates among those columns, and (read by
    column) gives rows [i1, N) their candidates among rows [i0, i1). That halves the matrix products of a
    full pass. A running top-k per row merges the candidates; the k-th smallest is exact whatever the order.
    """
    n = x.shape[0]
    best = torch.full((n, k), float("inf"), dtype=x.dtype, device=x.device)  # k smallest so far, per row
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        d2 = _sq_dists(x[i0:i1], x_sq[i0:i1], x[i0:], x_sq[i0:])  # (c, N - i0): rows i0:i1 vs columns i0:N
        d2.diagonal().fill_(float("inf"))  # entry (r, r) is the point i0 + r itself: exclude it
        rows = torch.topk(d2, min(k, n - i0), dim=1, largest=False, sorted=False).values  # (c, <=k)
        best[i0:i1] = _merge_smallest(best[i0:i1], rows, k)
        if i1 < n:  # the same block by column: rows i0:i1 are candidates of the points i1:N
            cols = torch.topk(d2[:, i1 - i0 :], min(k, i1 - i0), dim=0, largest=False, sorted=False).values
            best[i1:] = _merge_smallest(best[i1:], cols.T, k)  # cols: (<=k, N - i1) -> (N - i1, <=k)
    return best.amax(dim=1)  # the largest of the k smallest is the k-th smallest


@torch.no_grad()
def _prepared(real_features, fake_features, k, chunk_size, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both sets checked and on one device and dtype (float64 if either is, else float32), and the chunk size."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: must be an integer >= 1")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size={chunk_size!r}: must be an integer >= 1 or None (automatic)")

    real = _as_tensor("real_features", real_features)
    fake = _as_tensor("fake_features", fake_features)
    _check_features("real_features", real, k)
    _check_features("fake_features", fake, k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature dimensions differ: real_features has D={real.shape[1]}, fake_features has "
            f"D={fake.shape[1]}; both sets must have the same D"
        )

    dtype = torch.float64 if torch.float64 in (real.dtype, fake.dtype) else torch.float32
    device = torch.device(device) if device is not None else real.device
    real = real.to(device=device, dtype=dtype)
    fake = fake.to(device=device, dtype=dtype)
    n, m = real.shape[0], fake.shape[0]
    if chunk_size is None:
        itemsize = torch.finfo(dtype).bits // 8
        chunk_size = max(1, _DEFAULT_BLOCK_BYTES // (itemsize * max(n, m)))

    return real, fake, int(chunk_size)


def precision_recall(
    real_features: torch.Tensor | np.ndarray,
    fake_features: torch.Tensor | np.ndarray,
    k: int = 3,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    points: bool = False,
) -> dict[str, Any]:
    """Precision and recall (Kynkaanniemi et al. 2019) and density and coverage (Naeem et al. 2020).

    Args:
        real_features: (N, D) features of real images (torch tensor or numpy array).
        fake_features: (M, D) features of generated images.
        k: neighbourhood size; each point's radius is the distance to its k-th nearest neighbour within its
            own set, the point itself excluded (so each set needs at least k + 1 points).
        chunk_size: rows of a set processed at once; memory is O(chunk_size * max(N, M)) on top of the
            inputs and no N x N matrix is ever held. Default: blocks of about 256 MiB.
        device: where to compute (CPU or CUDA); default: the device of ``real_features`` (CPU for numpy).

    Returns:
        ``{"precision", "recall", "density", "coverage"}`` as Python floats. Density can exceed 1. With
        ``points``, also ``"precise"`` (M,) and ``"recalled"`` (N,) boolean numpy arrays: which fakes lie in
        some real ball and which reals in some fake ball (precision and recall are their means).

    Distances are computed as squared Euclidean distances ``|x|^2 + |y|^2 - 2 x.y`` (matmul, TF32 disabled
    on CUDA), in float64 when either input is float64 and in float32 otherwise (integer, half and bfloat16
    inputs are computed in float32). Comparisons are made on squared distances, so for integer-valued
    features whose squared norms stay below 2^24 (float32) or 2^53 (float64) every distance is exact and
    ties follow the ``<=`` of the papers exactly, whatever ``chunk_size``.

    Raises:
        ValueError: k < 1, chunk_size < 1, inputs not 2-D, feature dimensions differ, fewer than k + 1
            points in a set, or non-finite features.
    """
    real, fake, chunk = _prepared(real_features, fake_features, k, chunk_size, device)
    k, device, dtype, n, m = int(k), real.device, real.dtype, real.shape[0], fake.shape[0]

    with _full_precision_matmul(device):
        real_sq = torch.einsum("nd,nd->n", real, real)  # (N,) squared norms, no (N, D) temporary
        fake_sq = torch.einsum("md,md->m", fake, fake)  # (M,)
        # Within-set blocks cover a triangle: smaller blocks waste less on the diagonal (at least 256 rows, so
        # each product stays large enough to run near peak speed).
        real_r2 = _kth_nn_sq_radii(real, real_sq, k, min(chunk, max(256, -(-n // 16))))  # (N,) radii r_i^2
        fake_r2 = _kth_nn_sq_radii(fake, fake_sq, k, min(chunk, max(256, -(-m // 16))))  # (M,) radii s_j^2

        precise = torch.zeros(m, dtype=torch.bool, device=device)  # Y_j in some real ball
        density_count = torch.zeros((), dtype=torch.int64, device=device)  # #(j, i) with Y_j in ball of X_i
        recalled = torch.zeros(n, dtype=torch.bool, device=device)  # X_i in the ball of some Y_j so far
        nn_fake_d2 = torch.full((n,), float("inf"), dtype=dtype, device=device)  # min_j d(X_i, Y_j)^2 so far
        for start in range(0, m, chunk):
            stop = min(start + chunk, m)
            d2 = _sq_dists(fake[start:stop], fake_sq[start:stop], real, real_sq)  # (c, N): d(Y_j, X_i)^2
            in_real_ball = d2 <= real_r2[None, :]  # (c, N); real_r2: (N,) -> (1, N)
            precise[start:stop] = in_real_ball.any(dim=1)
            density_count += in_real_ball.sum()
            del in_real_ball
            recalled |= (d2 <= fake_r2[start:stop, None]).any(dim=0)  # fake radii (c,) -> (c, 1)
            torch.minimum(nn_fake_d2, d2.min(dim=0).values, out=nn_fake_d2)
        covered = (nn_fake_d2 <= real_r2).sum()

    out: dict[str, Any] = {
        "precision": int(precise.sum()) / m,
        "recall": int(recalled.sum()) / n,
        "density": int(density_count) / (k * m),
        "coverage": int(covered) / n,
    }
    if points:
        out.update(precise=precise.cpu().numpy(), recalled=recalled.cpu().numpy())
    return out
