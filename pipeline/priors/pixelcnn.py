"""Gated PixelCNN prior over a discrete code grid (van den Oord et al. 2016, "Conditional Image Generation
with PixelCNN Decoders"), as used for the VQ-VAE-2 priors (Razavi et al. 2019).

Architecture (``L`` layers, ``C`` channels, kernel ``k``, ``p = k // 2``):

* Input: a learned embedding of the codes (not one-hot), (B, C, H, W).
* Vertical stack: a ``(p + 1) x k`` convolution over the rows ``i - p .. i`` (all columns ``j - p .. j + p``).
  It may see the whole current row, so it is never used at its own row: its pre-activation goes through a
  1x1 convolution and is *shifted down by one row* before it is added to the horizontal stack (the
  "down-shift"). Position (i, j) thus receives, through the vertical stack, every row above it, including
  the pixels above and to the right, so there is no blind spot.
* Horizontal stack: a ``1 x (p + 1)`` convolution over the columns ``j - p .. j`` of the current row. The
  first layer is type 'A' (the current position is excluded): its input is the embedding *shifted right by one
  column* (the "right-shift"), so it sees ``j - p - 1 .. j - 1``. Later layers are type 'B' (they may see the
  current position of the previous layer's output, which itself only depends on earlier positions) and have a
  residual connection; every layer adds a 1x1 skip projection, summed into the output head.
* Gates: ``tanh(a) * sigmoid(b)`` in both stacks, where the pre-activation ``[a, b]`` gets the conditioning
  added as a bias: a class embedding (``num_classes + 1`` rows, the last one the null label; only when
  ``num_classes > 0``) and, for a bottom prior, per-layer 1x1 projections of a conditioning network over the
  top codes (embedding -> 3x3 conv -> residual blocks at the top resolution -> nearest upsampling to the
  bottom grid -> 3x3 conv), added in both stacks.
* Output head: ReLU -> 1x1 -> ReLU -> 1x1 to ``K`` logits, returned as (B, H*W, K) in raster order.

Sampling (``begin`` / ``step``): the state holds the canvas of codes sampled so far, the label biases and the
output of the conditioning network (computed once in ``begin``; the per-layer 1x1 projections are applied
one row at a time, so the state stays small even for large grids and batches). With ``use_cache=True`` (the
default) a step is incremental and exact: when a row is complete the vertical stack is advanced by that one
row (each layer keeps a window of its last ``p`` input rows), and the horizontal stack then runs on the
current row only, up to the current column. With ``use_cache=False`` every step runs the full network on the
canvas (slow reference path). Both give the logits of ``forward`` up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.priors.base import Decoding, Prior


def _gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation: tanh of the first half of the channels times sigmoid of the second half."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def _down_shift(x: torch.Tensor) -> torch.Tensor:
    """Shift (B, C, H, W) down by one row; row 0 becomes zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def _right_shift(x: torch.Tensor) -> torch.Tensor:
    """Shift (B, C, H, W) right by one column; column 0 becomes zeros."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class _GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack (type 'A' if ``first`` else type 'B')."""

    def __init__(self, channels: int, kernel_size: int, first: bool, dropout: float) -> None:
        super().__init__()
        self.pad = kernel_size // 2
        self.first = first
        self.v_conv = nn.Conv2d(channels, 2 * channels, (self.pad + 1, kernel_size))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, self.pad + 1))
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: torch.Tensor, h: torch.Tensor, bv: torch.Tensor | None,
                bh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer over whole grids (training; the cached sampling path calls the two halves row by row):
        (vertical, horizontal, skip) from the stacks (B, C, H, W) and the layer's gate biases. A ``forward`` of
        its own makes the layer a unit FSDP can shard and activation checkpointing can recompute."""
        v_pre = self.vertical(F.pad(v, (0, 0, self.pad, 0)))  # (B, 2C, H, W): row i sees rows <= i
        v2h = _down_shift(self.v_to_h(v_pre))  # rows < i only
        h, skip = self.horizontal(h, v2h, bh)
        return _gate(v_pre if bv is None else v_pre + bv), h, skip

    def vertical(self, v: torch.Tensor) -> torch.Tensor:
        """Vertical pre-activation (B, 2C, h - p, W) from input rows (B, C, h, W) already top-padded by p."""
        return self.v_conv(F.pad(v, (self.pad, self.pad, 0, 0)))

    def horizontal(
        self, h: torch.Tensor, v2h: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(new horizontal stack, skip) from the horizontal input h (B, C, h, w), the down-shifted vertical
        contribution v2h (B, 2C, h, w) and the gate bias (broadcastable to (B, 2C, h, w) or None)."""
        inp = _right_shift(h) if self.first else h
        pre = self.h_conv(F.pad(inp, (self.pad, 0, 0, 0))) + v2h
        if bias is not None:
            pre = pre + bias
        g = self.dropout(_gate(pre))
        out = self.h_out(g)
        if not self.first:  # no residual in the 'A' layer: its input includes the current position
            out = out + h
        return out, self.skip(g)


class _ResBlock(nn.Module):
    """x + 1x1(ReLU(3x3(ReLU(x)))) at constant resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _ConditioningNet(nn.Module):
    """Top codes (B, Hc, Wc) -> features (B, cond_channels, H, W) at the modelled (bottom) resolution."""

    def __init__(self, num_codes: int, channels: int, res_blocks: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.embed = nn.Embedding(num_codes, channels)
        self.inp = nn.Conv2d(channels, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(channels) for _ in range(res_blocks)])
        self.out = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.inp(self.embed(codes).permute(0, 3, 1, 2))
        x = F.relu(self.blocks(x))
        x = F.interpolate(x, size=self.grid, mode="nearest")
        return F.relu(self.out(x))


@dataclass
class _SamplingState:
    """What ``GatedPixelCNN.step`` needs between calls (opaque to the sampling loop)."""

    canvas: torch.Tensor  # (B, H, W) long, codes written so far
    cond_feat: torch.Tensor | None  # (B, cond_channels, H, W), output of the conditioning network
    label_bias: torch.Tensor | None  # (B, L * 4C), class biases of every gate
    use_cache: bool
    next_t: int = 0
    # incremental path only
    v_windows: list[torch.Tensor] = field(default_factory=list)  # per layer (B, C, p, W): last p input rows
    v2h_row: list[torch.Tensor] = field(default_factory=list)  # per layer (B, 2C, 1, W) for the current row
    bias_row: torch.Tensor | None = None  # (B, L, 4C, 1, W|1) gate biases of the current row


class GatedPixelCNN(Prior):
    """Gated PixelCNN prior without blind spot, with optional class and top-level code conditioning."""

    def __init__(
        self,
        grid: tuple[int, int],
        num_codes: int,
        num_classes: int = 0,
        cond_grid: tuple[int, int] | None = None,
        cond_num_codes: int = 0,
        channels: int = 64,
        layers: int = 8,
        kernel_size: int = 5,
        cond_channels: int = 64,
        cond_res_blocks: int = 2,
        dropout: float = 0.0,
    ) -> None:
        """
        Args:
            grid: (H, W) of the modelled code grid.
            num_codes: K, codebook size of the modelled level (number of logits per position).
            num_classes: number of classes for class conditioning; 0 = unconditional (labels are ignored).
                Label ``num_classes`` is the null label (used for classifier-free guidance).
            cond_grid: (Hc, Wc) of the conditioning (top) level for a bottom prior; None for a top prior.
            cond_num_codes: codebook size of the conditioning level (required > 0 when ``cond_grid`` is set).
            channels: C, channels of the vertical and horizontal stacks (and of the code embedding).
            layers: L, number of gated layers (the first is type 'A', the others type 'B'). The receptive
                field grows by ``kernel_size // 2`` rows and columns per layer.
            kernel_size: odd k >= 3; the vertical stack uses (k//2 + 1) x k kernels, the horizontal stack
                1 x (k//2 + 1).
            cond_channels: channels of the conditioning network over the top codes.
            cond_res_blocks: residual blocks of the conditioning network (at the top resolution).
            dropout: dropout probability on the gated horizontal activations (training only).
        """
        super().__init__(grid, num_codes, num_classes, cond_grid, cond_num_codes)
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size}: must be odd and >= 3")
        if layers < 1 or channels < 1:
            raise ValueError(f"layers={layers}, channels={channels}: must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: must be in [0, 1)")
        if cond_grid is not None and (cond_channels < 1 or cond_res_blocks < 0):
            raise ValueError(f"cond_channels={cond_channels}, cond_res_blocks={cond_res_blocks}: bad values")
        self.channels = channels
        self.num_layers = layers
        self.kernel_size = kernel_size
        self.pad = kernel_size // 2

        self.embed = nn.Embedding(num_codes, channels)
        self.blocks = nn.ModuleList(
            [_GatedLayer(channels, kernel_size, first=(i == 0), dropout=dropout) for i in range(layers)]
        )
        gate_bias = layers * 4 * channels  # per layer: 2C for the vertical gate, 2C for the horizontal gate
        self.label_bias = nn.Embedding(num_classes + 1, gate_bias) if num_classes > 0 else None
        if self.label_bias is not None:
            nn.init.normal_(self.label_bias.weight, std=0.1)
        if self.cond_grid is not None:
            self.cond_net = _ConditioningNet(cond_num_codes, cond_channels, cond_res_blocks, self.grid)
            self.cond_proj = nn.Conv2d(cond_channels, gate_bias, 1)  # = one 1x1 conv per layer and stack
        else:
            self.cond_net = None
            self.cond_proj = None
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, num_codes, 1)
        )

    # ------------------------------------------------------------------ conditioning

    def _conditions(
        self, batch: int, labels: torch.Tensor | None, cond_codes: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(conditioning features (B, cond_channels, H, W) or None, label biases (B, L*4C) or None)."""
        label_bias = None
        if self.label_bias is not None:
            if labels is None:
                labels = self.null_labels(batch, device)
            if labels.shape != (batch,):
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected ({batch},)")
            labels = labels.to(device=device, dtype=torch.long)
            if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
                raise ValueError(
                    f"labels must be in [0, {self.num_classes}] ({self.num_classes} = null label)"
                )
            label_bias = self.label_bias(labels)
        cond_feat = None
        if self.cond_net is not None:
            if cond_codes is None:
                raise ValueError(
                    f"this prior is conditioned on a {self.cond_grid} code grid: pass cond_codes"
                )
            if tuple(cond_codes.shape) != (batch, *self.cond_grid):
                raise ValueError(
                    f"cond_codes have shape {tuple(cond_codes.shape)}, "
                    f"expected ({batch}, {self.cond_grid[0]}, {self.cond_grid[1]})"
                )
            cond_feat = self.cond_net(cond_codes.to(device=device, dtype=torch.long))
        elif cond_codes is not None:
            raise ValueError("cond_codes given to a prior built without cond_grid")
        return cond_feat, label_bias

    def _gate_bias(
        self, cond_feat: torch.Tensor | None, label_bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Gate biases (B, L, 4C, h, w) from conditioning features (B, cc, h, w) (or (B, L, 4C, 1, 1) from
        labels alone), or None without any conditioning."""
        bias = None if cond_feat is None else self.cond_proj(cond_feat)
        if label_bias is not None:
            lb = label_bias[:, :, None, None]
            bias = lb if bias is None else bias + lb
        if bias is None:
            return None
        return bias.view(bias.shape[0], self.num_layers, 4 * self.channels, *bias.shape[-2:])

    @staticmethod
    def _split(bias: torch.Tensor | None, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(vertical, horizontal) gate biases of one layer."""
        if bias is None:
            return None, None
        bv, bh = bias[:, layer].chunk(2, dim=1)
        return bv, bh

    # ------------------------------------------------------------------ full network

    def _logits(self, codes: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K, H, W) for a code grid (B, H, W) with gate biases from ``_gate_bias``."""
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, C, H, W)
        v, h = x, x
        skip = torch.zeros_like(x)
        for i, blk in enumerate(self.blocks):
            v, h, s = blk(v, h, *self._split(bias, i))
            skip = skip + s
        return self.head(skip)

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(
                f"codes have shape {tuple(codes.shape)}, expected (B, {self.grid[0]}, {self.grid[1]})"
            )

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor | None = None,
        cond_codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, H*W, K): position t predicts codes[t] (raster order) from codes[<t] and conditions."""
        self._check_codes(codes)
        cond_feat, label_bias = self._conditions(codes.shape[0], labels, cond_codes, codes.device)
        logits = self._logits(codes.long(), self._gate_bias(cond_feat, label_bias))
        return logits.flatten(2).transpose(1, 2)  # (B, H*W, K)

    # ------------------------------------------------------------------ sampling

    def begin(
        self,
        batch: int,
        labels: torch.Tensor | None,
        cond_codes: torch.Tensor | None,
        use_cache: bool = True,
        decoding: Decoding | None = None,
    ) -> _SamplingState:
        """Start sampling ``batch`` grids. Runs the conditioning network once. ``use_cache=True`` selects the
        incremental step (one row of the vertical stack per completed row, the horizontal stack on the current
        row only); ``use_cache=False`` recomputes the full network at every step (reference path). ``decoding``
        is ignored: this row cache does not grow with the sequence (a few rows per layer, of fixed size), so there
        is no cache to preallocate, and compiling its two kinds of step (row start, within a row) is not done."""
        device = self.embed.weight.device
        cond_feat, label_bias = self._conditions(batch, labels, cond_codes, device)
        canvas = torch.zeros(batch, *self.grid, dtype=torch.long, device=device)
        return _SamplingState(canvas=canvas, cond_feat=cond_feat, label_bias=label_bias, use_cache=use_cache)

    def step(self, state: _SamplingState, t: int, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K) at raster position ``t``; ``prev`` (B,) is the code chosen at t - 1 (None at t=0)."""
        H, W = self.grid
        if t != state.next_t:
            raise ValueError(
                f"step called for t={t}, expected t={state.next_t} (positions go in raster order)"
            )
        if not 0 <= t < H * W:
            raise ValueError(f"t={t} outside the grid of {H * W} positions")
        if t > 0:
            if prev is None:
                raise ValueError(f"prev is required for t={t} > 0")
            r, c = divmod(t - 1, W)
            state.canvas[:, r, c] = prev.to(state.canvas)
        state.next_t = t + 1
        i, j = divmod(t, W)
        if not state.use_cache:
            bias = self._gate_bias(state.cond_feat, state.label_bias)
            return self._logits(state.canvas, bias)[:, :, i, j]
        if j == 0:
            self._advance_row(state, i)
        # horizontal stack on the current row, columns 0..j (later columns cannot influence column j)
        h = self.embed(state.canvas[:, i, : j + 1]).permute(0, 2, 1).unsqueeze(2)  # (B, C, 1, j+1)
        skip = None
        bias = state.bias_row
        if bias is not None and bias.shape[-1] > 1:
            bias = bias[..., : j + 1]
        for layer, blk in enumerate(self.blocks):
            _, bh = self._split(bias, layer)
            h, s = blk.horizontal(h, state.v2h_row[layer][..., : j + 1], bh)
            s = s[..., -1:]
            skip = s if skip is None else skip + s
        return self.head(skip)[:, :, 0, 0]

    def _row_bias(self, state: _SamplingState, row: int) -> torch.Tensor | None:
        feat = None if state.cond_feat is None else state.cond_feat[:, :, row : row + 1]
        return self._gate_bias(feat, state.label_bias)

    def _advance_row(self, state: _SamplingState, i: int) -> None:
        """Before the first position of row i: feed the completed row i - 1 through the vertical stack (each
        layer keeps its last p input rows) and store the down-shifted contributions for row i."""
        batch, W, C = state.canvas.shape[0], self.grid[1], self.channels
        ref = self.embed.weight
        if i == 0:
            state.v_windows = [ref.new_zeros(batch, C, self.pad, W) for _ in self.blocks]
            state.v2h_row = [ref.new_zeros(batch, 2 * C, 1, W) for _ in self.blocks]  # down-shift: zeros
        else:
            prev_bias = state.bias_row  # biases of row i - 1
            v = self.embed(state.canvas[:, i - 1]).permute(0, 2, 1).unsqueeze(2)  # (B, C, 1, W)
            for layer, blk in enumerate(self.blocks):
                inp = torch.cat([state.v_windows[layer], v], dim=2)  # (B, C, p + 1, W): rows i-1-p .. i-1
                state.v_windows[layer] = inp[:, :, 1:]
                v_pre = blk.vertical(inp)  # (B, 2C, 1, W) at row i - 1
                state.v2h_row[layer] = blk.v_to_h(v_pre)
                bv, _ = self._split(prev_bias, layer)
                v = _gate(v_pre if bv is None else v_pre + bv)
        state.bias_row = self._row_bias(state, i)
