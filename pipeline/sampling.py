"""Ancestral sampling of code grids with truncation controls (temperature, top-k, top-p) and
classifier-free guidance, shared by every prior through the ``Prior.begin / step`` interface.

Randomness is drawn per image from ``(seed, level, image index)``, so the same seed and settings give
the same images whatever the batch size or the number of processes the images are spread over.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from pipeline.config import check_sampling_settings
from pipeline.priors.base import Decoding, Prior


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (Holtzman et al. 2019) on (B, K) logits; removed entries are -inf.

    The autoregressive form of the truncation trick: a lower temperature or a smaller allowed set trades
    diversity (recall) for quality (precision).
    """
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability mass strictly before each token
        remove_sorted = mass_before >= top_p  # keeps the smallest prefix whose mass reaches top_p (>= 1 token)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits) (B, K) with one uniform number per row (B,): deterministic given the
    uniforms, and never picks a token whose logit is -inf."""
    probs = logits.float().softmax(-1)
    cdf = probs.cumsum(-1)
    u = (uniform.to(cdf) * cdf[:, -1]).unsqueeze(-1)  # (B, 1), scaled so rounding in cdf[-1] cannot overflow
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    idx = idx.clamp_max(logits.shape[-1] - 1)
    # searchsorted may land on a zero-probability entry only where cdf is flat; step back to a real token
    bad = probs.gather(-1, idx[:, None]).squeeze(-1) <= 0
    if bad.any():
        idx = torch.where(bad, probs.argmax(-1), idx)
    return idx


def is_guided(prior: Prior, guidance: float, labels: torch.Tensor | None) -> bool:
    """Whether sampling runs classifier-free guidance: one conditional and one null-label row per image."""
    return guidance != 1.0 and prior.num_classes > 0 and labels is not None


def kv_cache_bytes(prior: Prior, batch: int, guided: bool = False, dtype: torch.dtype | None = None) -> int:
    """Bytes of the key/value cache of sampling ``batch`` grids of ``prior`` in ``dtype`` (default: its weights'),
    whose batch guidance doubles: 2 x layers x batch (x 2) x positions x n_embd x bytes per element for a GPT, 0
    for a PixelCNN."""
    return prior.cache_bytes_per_grid(dtype) * batch * (2 if guided else 1)


def cache_batch_limit(priors: list[Prior], max_bytes: float, guided: bool, dtype: torch.dtype | None = None) -> int:
    """The most images sampled at once whose largest key/value cache (the level with the most) fits ``max_bytes``;
    0 when not even one does (levels are sampled one after the other: only one level's cache lives at a time)."""
    per_image = max(kv_cache_bytes(p, 1, guided, dtype) for p in priors)
    return int(max_bytes // per_image) if per_image else sys.maxsize


def image_uniforms(seed: int, level: int, indices: range | list[int], length: int) -> torch.Tensor:
    """(len(indices), length) uniforms in [0, 1); row i depends only on (seed, level, indices[i])."""
    rows = [np.random.default_rng([seed, level, int(i)]).random(length) for i in indices]
    return torch.from_numpy(np.stack(rows)).float() if rows else torch.zeros(0, length)


@torch.no_grad()
def sample_level(
    prior: Prior,
    uniforms: torch.Tensor,  # (B, T) from image_uniforms
    labels: torch.Tensor | None = None,  # (B,) long
    cond_codes: torch.Tensor | None = None,  # (B, Hc, Wc) long
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    guidance: float = 1.0,
    use_cache: bool = True,
    decoding: Decoding | None = None,
) -> torch.Tensor:
    """Sample one level's code grid (B, H, W) from ``prior`` in raster order; ``decoding`` chooses a GPT's key/value
    cache (dynamic or static) and whether its step is compiled."""
    check_sampling_settings(temperature, top_k, top_p, guidance)
    batch, length = uniforms.shape
    if length != prior.seq_len:
        raise ValueError(f"uniforms have length {length}, the prior's grid has {prior.seq_len} positions")
    device = next(prior.parameters()).device
    guided = is_guided(prior, guidance, labels)
    if guided:  # rows [0, B) conditional, [B, 2B) with the null label
        labels = torch.cat([labels, prior.null_labels(batch, labels.device)])
        cond_codes = None if cond_codes is None else torch.cat([cond_codes, cond_codes])
    if labels is not None:
        labels = labels.to(device)
    if cond_codes is not None:
        cond_codes = cond_codes.to(device)
    state = prior.begin(batch * (2 if guided else 1), labels, cond_codes, use_cache=use_cache, decoding=decoding)
    out = torch.empty(batch, length, dtype=torch.long, device=device)
    prev = None
    uniforms = uniforms.to(device)
    for t in range(length):
        logits = prior.step(state, t, prev).float()  # (B or 2B, K)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance * (cond - uncond)
        token = sample_token(filter_logits(logits, temperature, top_k, top_p), uniforms[:, t])
        out[:, t] = token
        prev = torch.cat([token, token]) if guided else token
    return out.view(batch, *prior.grid)  # (B, H, W)
