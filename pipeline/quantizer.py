"""Vector quantization with straight-through gradients (van den Oord et al. 2017, "Neural Discrete
Representation Learning", https://arxiv.org/abs/1711.00937), with the tricks that keep a codebook alive:

- nearest-neighbour assignment ``k* = argmin_k ||z_e - e_k||``, ``z_q = e_k*``;
- straight-through estimator ``z_e + sg[z_q - z_e]``: the decoder's gradient at z_q is copied to z_e;
- commitment loss ``beta ||z_e - sg[e]||^2`` on the encoder, and either the codebook loss ``||sg[z_e] - e||^2``
  (``kind="loss"``) or exponential-moving-average codebook updates with Laplace-smoothed counts
  (``kind="ema"``, appendix of the paper; Razavi et al. 2019);
- data-dependent initialisation: k-means on the first training batch's encoder outputs;
- restart of dead codes: a code unused for ``restart_after`` steps is moved onto a random recent encoder output.

Quantization always runs in fp32, also under bf16/fp16 autocast (half-precision distances pick wrong codes).
In multi-process runs the EMA statistics are all-reduced and the k-means init and restarts are broadcast from
rank 0, so every rank holds the same codebook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, D, H, W), straight-through in training
    indices: torch.Tensor  # (B, H, W) long
    loss: torch.Tensor  # commitment (+ codebook) loss, scalar
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor  # zero with EMA updates
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram
    usage: torch.Tensor  # fraction of codes used in this batch


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Forward value z_q, gradient copied to z_e (Bengio et al. 2013)."""
    return z_e + (z_q - z_e).detach()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on (N, D) points; returns (k, D) centroids. Starts from k random points (with
    replacement and a little noise when N < k); empty clusters keep their previous centroid."""
    n = x.shape[0]
    if n >= k:
        idx = torch.randperm(n, generator=generator, device="cpu")[:k].to(x.device)
        centroids = x[idx].clone()
    else:
        idx = torch.randint(n, (k,), generator=generator, device="cpu").to(x.device)
        noise = torch.randn(k, x.shape[1], generator=generator, device="cpu").to(x)
        centroids = x[idx] + 0.01 * x.std() * noise
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        kind: str = "ema",
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        restart_after: int = 50,
    ) -> None:
        """
        Args:
            codebook_size: number of codes K (>= 2).
            dim: code dimension D (channels of the encoder output).
            beta: weight of the commitment loss on the encoder.
            kind: "ema" (codebook as an EMA of assigned encoder outputs) or "loss" (codebook learnt by gradient).
            decay: EMA decay.
            eps: Laplace smoothing of the EMA counts.
            kmeans_init: initialise the codebook by k-means on the first training batch.
            kmeans_iters: Lloyd iterations of that init.
            restart_after: restart a code unused for this many training steps (0 = never).
        """
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size={codebook_size}: must be >= 2")
        if kind not in ("ema", "loss"):
            raise ValueError(f"kind={kind!r}: choose ema or loss")
        self.codebook_size, self.dim, self.beta, self.kind = codebook_size, dim, beta, kind
        self.decay, self.eps = decay, eps
        self.kmeans_iters, self.restart_after = kmeans_iters, restart_after
        init = torch.randn(codebook_size, dim) / dim**0.5
        if kind == "ema":
            self.register_buffer("codebook", init.clone())
            self.register_buffer("ema_count", torch.ones(codebook_size))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))

    def _apply(self, fn, recurse: bool = True):
        """Moves and casts like any module (``.to``, ``.cuda``, ``.half``), but floating-point buffers (the EMA
        codebook and its statistics) keep their float32 values and dtype: in bf16 an EMA with decay 0.99 loses
        most of each 1% step. ``model.to(torch.bfloat16)`` is what Fabric's ``bf16-true`` precision does."""
        before = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # a cast: keep the values and dtype, take only the move
                self._buffers[name] = old.to(device=new.device)
        return self

    # ------------------------------------------------------------------------------------------------------
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of the nearest codes to (N, D) fp32 vectors: argmin ||z||^2 - 2 z.e + ||e||^2."""
        codebook = self.codebook.float()
        dist2 = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None])  # (N, K)
        return dist2.argmin(1)

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) -> vectors (B, D, H, W)."""
        return rearrange(F.embedding(indices, self.codebook.float()), "b h w d -> b d h w")

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        centroids = kmeans(flat, self.codebook_size, self.kmeans_iters)
        _broadcast(centroids)  # every rank starts from rank 0's centroids
        self.codebook.data.copy_(centroids)
        if self.kind == "ema":
            self.ema_sum.copy_(centroids)
            self.ema_count.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, onehot_counts: torch.Tensor, indices: torch.Tensor) -> None:
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)  # (K, D) float32
        _all_reduce_sum(sums)
        self.ema_count.mul_(self.decay).add_(onehot_counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.codebook_size * self.eps) * total  # Laplace
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        dead = self.unused_steps >= self.restart_after  # identical on every rank (counts were all-reduced)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(flat.shape[0], (n_dead,), device=flat.device)
        new = flat[pick] + 1e-3 * flat.std() * torch.randn(n_dead, self.dim, device=flat.device, dtype=flat.dtype)
        _broadcast(new)
        self.codebook.data[dead] = new
        if self.kind == "ema":
            self.ema_sum[dead] = new
            self.ema_count[dead] = 1.0
        self.unused_steps.masked_fill_(dead, 0)

    # ------------------------------------------------------------------------------------------------------
    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """z_e (B, D, H, W) -> QuantizerOutput; updates the codebook (EMA, init, restarts) in training mode."""
        device_type = z_e.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            z = z_e.float()
            b, _, h, w = z.shape
            flat = rearrange(z, "b d h w -> (b h w) d")
            if self.training and not bool(self.initted):
                self._init_codebook(flat.detach())
            indices = self.nearest(flat.detach())  # (N,)
            counts = torch.bincount(indices, minlength=self.codebook_size).float()  # (K,)
            # (N, D) -> (B, D, H, W), with the codebook the assignment was made with
            z_q = rearrange(F.embedding(indices, self.codebook.float()), "(b h w) d -> b d h w", b=b, h=h, w=w)
            if self.training:
                _all_reduce_sum(counts)
                if self.kind == "ema":
                    self._ema_update(flat.detach(), counts, indices)
                if self.restart_after > 0:
                    self._restart_dead(flat.detach(), counts)
            commitment = F.mse_loss(z, z_q.detach())
            if self.kind == "loss":
                codebook_loss = F.mse_loss(z_q, z.detach())
            else:
                codebook_loss = torch.zeros((), device=z.device, dtype=z.dtype)
            loss = self.beta * commitment + codebook_loss
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            usage = (counts > 0).float().mean()
            quantized = straight_through(z, z_q) if z.requires_grad else z_q
            quantized = quantized.to(z_e.dtype)  # the encoder's dtype (bf16 under bf16-true or autocast)
        return QuantizerOutput(
            quantized=quantized,
            indices=indices.view(b, h, w),
            loss=loss,
            commitment_loss=commitment,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
            usage=usage,
        )
