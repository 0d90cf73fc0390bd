"""Hierarchical VQ-VAE-2 (Razavi et al. 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2",
https://arxiv.org/abs/1906.00446).

Levels are listed top (coarsest) first. With ``levels=2`` on a 32 x 32 input the bottom grid is 8 x 8 (1/4)
and the top grid 4 x 4 (1/8); ``strides`` sets each level's downsampling relative to the level below instead
(at 256 px, ``[8, 2]`` keeps the bottom grid at 32 x 32). Encoding runs bottom-up (each level's encoder
downsamples the previous features by its stride);
quantization runs top-down: a level's code vectors are decoded and concatenated to the encoder features of
the level below before that level is quantized, so lower levels encode what the upper ones miss. The image
decoder sees every level, upsampled to the bottom grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import VQVAEConfig
from pipeline.config import level_names as level_names  # re-exported: the level names belong to the VQ-VAE
from pipeline.quantizer import VectorQuantizer


class ResBlock(nn.Module):
    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, res_channels, 3, padding=1), nn.ReLU(), nn.Conv2d(res_channels, channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _halvings(stride: int) -> int:
    """log2 of a stride (a power of two >= 2): the stride-2 convolutions that make it."""
    return stride.bit_length() - 1


def _encoder(in_ch: int, ch: int, res_ch: int, n_res: int, stride: int) -> nn.Sequential:
    """Downsample by ``stride`` with stride-2 4x4 convolutions (widths ch/2, ch, ch, ...), a 3x3 convolution, then
    residual blocks. Strides 4 and 2 give VQ-VAE-2's bottom and upper encoders, layer for layer."""
    widths = [in_ch, ch // 2] + [ch] * (_halvings(stride) - 1)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, b, 4, 2, 1), nn.ReLU()]
    layers += [nn.Conv2d(widths[-1], ch, 3, padding=1)]
    layers += [ResBlock(ch, res_ch) for _ in range(n_res)] + [nn.ReLU()]
    return nn.Sequential(*layers)


def _decoder(in_ch: int, out_ch: int, ch: int, res_ch: int, n_res: int, stride: int) -> nn.Sequential:
    """Residual blocks, then upsample by ``stride`` with stride-2 transposed convolutions (the encoder's widths in
    reverse: ..., ch, ch/2, out_ch)."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 3, padding=1)]
    layers += [ResBlock(ch, res_ch) for _ in range(n_res)] + [nn.ReLU()]
    n = _halvings(stride)
    widths = [ch] * (n - 1) + ([ch // 2] if n > 1 else [ch]) + [out_ch]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def bounded_mse(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE that does not penalise overshooting the pixel range where the target sits at its edge: a pixel whose
    target is -1 (or 1) and whose output is below -1 (above 1) costs nothing, since it displays as the target.
    Every pixel with an interior target keeps its gradient, so unlike clamping the output the decoder cannot die.
    Plain MSE pulls a flat black background to -1 from both sides, so half of it shows as faint grey noise."""
    recon, target = recon.float(), target.float()
    past_edge = ((target <= -1) & (recon < -1)) | ((target >= 1) & (recon > 1))
    return torch.where(past_edge, torch.zeros_like(recon), recon - target).square().mean()


def _upsampler(dim: int, factor: int) -> nn.Module:
    """Code vectors of a level upsampled ``factor`` times (a power of two) to the bottom grid."""
    layers: list[nn.Module] = []
    while factor > 1:
        layers += [nn.ConvTranspose2d(dim, dim, 4, 2, 1), nn.ReLU()]
        factor //= 2
    return nn.Sequential(*layers[:-1]) if layers else nn.Identity()


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # (B, C, H, W)
    loss: torch.Tensor  # reconstruction MSE + quantizer losses
    recon_loss: torch.Tensor
    quantizer_loss: torch.Tensor
    codes: list[torch.Tensor]  # per level, top first: (B, h_l, w_l) long
    perplexity: list[torch.Tensor]  # per level, top first
    usage: list[torch.Tensor]  # per level, top first (fraction of the codebook used in this batch)


class VQVAE2(nn.Module):
    def __init__(self, cfg: VQVAEConfig, in_channels: int = 1) -> None:
        """
        Args:
            cfg: the ``vqvae`` config section (levels, widths, codebook).
            in_channels: image channels (1 grey, 3 RGB).
        """
        super().__init__()
        self.cfg, self.in_channels = cfg, in_channels
        n, ch, rc, nr, dim = cfg.levels, cfg.channels, cfg.res_channels, cfg.res_blocks, cfg.code_dim
        strides = cfg.level_strides()  # bottom first, each relative to the level below
        # index 0 is the bottom level inside the module; the public API lists levels top first
        self.encoders = nn.ModuleList(
            [_encoder(in_channels if i == 0 else ch, ch, rc, nr, strides[i]) for i in range(n)]
        )
        # pre-quantization 1x1 convs: the top level sees its encoder features; lower levels also the decoded level above
        self.pre_quant = nn.ModuleList(
            [nn.Conv2d(ch + (dim if i < n - 1 else 0), dim, 1) for i in range(n)]
        )
        self.quantizers = nn.ModuleList(
            [VectorQuantizer(cfg.codebook_size, dim, cfg.beta, cfg.quantizer, cfg.decay, cfg.eps,
                             cfg.kmeans_init, cfg.kmeans_iters, cfg.restart_after) for _ in range(n)]
        )
        # decode level i+1's codes (with what it was conditioned on) to level i's resolution
        self.level_decoders = nn.ModuleList(
            [_decoder(dim * (1 if i == n - 2 else 2), dim, ch, rc, nr, strides[i + 1]) for i in range(n - 1)]
        )
        self.upsamplers = nn.ModuleList([_upsampler(dim, math.prod(strides[1 : i + 1])) for i in range(n)])
        self.decoder = _decoder(dim * n, in_channels, ch, rc, nr, strides[0])

    @property
    def levels(self) -> int:
        return self.cfg.levels

    def grid_shapes(self, image_size: int) -> list[tuple[int, int]]:
        """Code grid (h, w) per level, top first."""
        return [(image_size // d,) * 2 for d in self.cfg.level_downsampling()]

    def _quantize(self, x: torch.Tensor):
        feats = []
        h = x
        for enc in self.encoders:  # bottom-up
            h = enc(h)
            feats.append(h)
        n = self.levels
        outs: list = [None] * n
        vecs: list = [None] * n
        context = None  # decoded code vectors of the level above, at this level's resolution
        for i in reversed(range(n)):  # top-down
            inp = feats[i] if context is None else torch.cat([feats[i], context], 1)
            q = self.quantizers[i](self.pre_quant[i](inp))
            outs[i], vecs[i] = q, q.quantized
            if i > 0:
                dec_in = q.quantized if context is None else torch.cat([q.quantized, context], 1)
                context = self.level_decoders[i - 1](dec_in)
        return outs, vecs

    def _decode_vectors(self, vecs: list[torch.Tensor]) -> torch.Tensor:
        """Code vectors per level (bottom first, internal order) -> image."""
        ups = [up(v) for up, v in zip(self.upsamplers, vecs)]  # all at the bottom grid
        return self.decoder(torch.cat(ups, 1))

    def _shown(self, recon: torch.Tensor) -> torch.Tensor:
        """The decoder's output as an image: trained with ``bounded`` MSE, values past -1 or 1 mean the edge itself."""
        return recon.clamp(-1.0, 1.0) if self.cfg.recon_loss == "bounded" else recon

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        outs, vecs = self._quantize(x)
        recon = self._decode_vectors(vecs)
        bounded = self.cfg.recon_loss == "bounded"
        recon_loss = bounded_mse(recon, x) if bounded else F.mse_loss(recon.float(), x.float())
        q_loss = sum(o.loss for o in outs)
        top_first = list(reversed(outs))
        return VQVAEOutput(
            reconstruction=self._shown(recon),
            loss=recon_loss + q_loss,
            recon_loss=recon_loss,
            quantizer_loss=q_loss,
            codes=[o.indices for o in top_first],
            perplexity=[o.perplexity for o in top_first],
            usage=[o.usage for o in top_first],
        )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> code grids per level, top first, each (B, h, w) long."""
        outs, _ = self._quantize(x)
        return [o.indices for o in reversed(outs)]

    def decode_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Code grids per level (top first) -> images (B, C, H, W), roughly in [-1, 1] (within it: ``bounded``)."""
        if len(codes) != self.levels:
            raise ValueError(f"expected {self.levels} code grids (top first), got {len(codes)}")
        vecs = [q.dequantize(c) for q, c in zip(self.quantizers, reversed(codes))]  # bottom first
        dtype = next(self.decoder.parameters()).dtype
        return self._shown(self._decode_vectors([v.to(dtype) for v in vecs]))
