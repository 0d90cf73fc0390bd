"""The small interface every prior implements, so sampling and evaluation do not care which one they have.

A prior models one level's code grid (H, W) in raster order:
    p(codes) = prod_t p(codes_t | codes_<t, label, cond_codes)
where ``label`` is an optional class index and ``cond_codes`` the code grid of the level above
(the bottom prior is conditioned on the top codes, as in VQ-VAE-2, Razavi et al. 2019).

Labels: a LongTensor (B,) with values in [0, num_classes]; the value ``num_classes`` is the *null*
label (no class), used by unconditional models and for classifier-free guidance (Ho & Salimans 2022).
A prior built with ``num_classes == 0`` ignores labels (pass ``None``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import check_decoding


@dataclass(frozen=True)
class Decoding:
    """How a transformer prior runs its cached sampling steps (``sample.kv_cache``, ``sample.compile``).

    ``kv_cache``: "dynamic" (transformers' ``DynamicCache``, grown by one position per step) or "static"
    (``StaticCache``, preallocated at the first forward to every position the network sees). ``compile``:
    ``torch.compile`` the one-code step, whose shapes the static cache keeps fixed. Priors whose sampling state does
    not grow with the sequence (the PixelCNN keeps a few rows, already of fixed size) ignore both.
    """

    kv_cache: str = "dynamic"
    compile: bool = False

    def __post_init__(self) -> None:
        check_decoding(self.kv_cache, self.compile)


class Prior(nn.Module, ABC):
    """Base class: the shapes below (checked and set by ``Prior.__init__``) and the three methods to implement."""

    grid: tuple[int, int]  # (H, W) of the modelled level
    num_codes: int  # K, codebook size of the modelled level
    num_classes: int  # 0 = unconditional
    cond_grid: tuple[int, int] | None  # (Hc, Wc) of the conditioning level, None for the top prior
    cond_num_codes: int  # codebook size of the conditioning level (0 if none)

    def __init__(self, grid: tuple[int, int], num_codes: int, num_classes: int = 0,
                 cond_grid: tuple[int, int] | None = None, cond_num_codes: int = 0) -> None:
        """Check and set the shapes every prior shares (see the attributes above)."""
        super().__init__()
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid={grid}: must be (H, W) with H, W >= 1")
        if num_codes < 1:
            raise ValueError(f"num_codes={num_codes}: must be >= 1")
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes}: must be >= 0 (0 = unconditional)")
        if cond_grid is not None and (len(cond_grid) != 2 or min(cond_grid) < 1):
            raise ValueError(f"cond_grid={cond_grid}: must be (Hc, Wc) with Hc, Wc >= 1, or None")
        if cond_grid is not None and cond_num_codes < 1:
            raise ValueError(f"cond_num_codes={cond_num_codes}: must be >= 1 with cond_grid={cond_grid}")
        if cond_grid is None and cond_num_codes != 0:
            raise ValueError(f"cond_num_codes={cond_num_codes}: must be 0 without cond_grid")
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_codes = int(num_codes)
        self.num_classes = int(num_classes)
        self.cond_grid = None if cond_grid is None else (int(cond_grid[0]), int(cond_grid[1]))
        self.cond_num_codes = int(cond_num_codes)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    def cache_bytes_per_grid(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the sampling state of one grid that grow with its sequence (a transformer's key/value cache),
        once every position is fed, in ``dtype`` (default: the weights'); 0 for a state that stays small (the
        PixelCNN keeps a few rows)."""
        return 0

    def null_labels(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    @abstractmethod
    def forward(
        self,
        codes: torch.Tensor,  # (B, H, W) long
        labels: torch.Tensor | None = None,  # (B,) long, num_classes = null
        cond_codes: torch.Tensor | None = None,  # (B, Hc, Wc) long
    ) -> torch.Tensor:
        """Logits (B, H*W, K): position t predicts codes[t] (raster order) from codes[<t] and the conditions."""

    @abstractmethod
    def begin(
        self,
        batch: int,
        labels: torch.Tensor | None,
        cond_codes: torch.Tensor | None,
        use_cache: bool = True,
        decoding: Decoding | None = None,
    ) -> Any:
        """Prepare autoregressive sampling of ``batch`` grids; returns an opaque state for ``step``. ``decoding``
        (default ``Decoding()``) chooses a key/value cache where the prior has one."""

    @abstractmethod
    def step(self, state: Any, t: int, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K) for raster position ``t`` given the code just sampled at ``t - 1`` (``prev``, (B,) long;
        None when t == 0). Called for t = 0, 1, ..., H*W - 1 in order."""
