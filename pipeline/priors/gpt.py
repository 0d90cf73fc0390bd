"""Transformer prior: a Hugging Face ``transformers`` causal language model over one level's code grid.

The network is built from a config (GPT-2 or Llama architecture, random initialisation, never pretrained
weights) with PyTorch scaled-dot-product attention (``attn_implementation="sdpa"``).

Token layout
------------
One shared vocabulary of ``K + Kc + C + 1`` ids::

    [0, K)                  codes of the modelled level (K = num_codes)
    [K, K + Kc)             codes of the conditioning (top) level, offset by K (Kc = cond_num_codes; 0 = none)
    [K + Kc, K + Kc + C)    class tokens, one per class (C = num_classes)
    K + Kc + C              the null / start token (no class; also the classifier-free guidance null label)

A label ``y`` in ``[0, C]`` maps to id ``K + Kc + y``, so the null label ``C`` is the null/start token.

Sequence (fixed length, no padding, so no attention mask is needed)::

    [class or null token] + [top codes, raster order (bottom prior only), P = Hc * Wc] + [codes, T = H * W]

The first ``1 + P`` tokens are a conditioning *prefix*: they are never predicted (no loss on them).
As in any causal LM, input position ``j`` predicts token ``j + 1``; code ``t`` sits at sequence index
``1 + P + t`` and is predicted by input position ``P + t``. The last code is never an input, so the network
sees ``P + T`` positions (``n_positions`` / ``max_position_embeddings`` is exactly that). ``forward`` keeps
the outputs of positions ``P .. P + T - 1`` and the first ``K`` vocabulary entries (the level's codes), so
``logits[:, t]`` predicts ``codes[:, t]``.

Windowed conditioning (``cond_window = k > 0``, odd): no upper codes in the sequence (and none in the
vocabulary), so it is ``[class or null token] + [codes]`` (``P = 0``, ``T`` positions seen) instead of
``1 + Hc * Wc + T`` (at 256 px with grids 32 and 64: 4,096 instead of 5,120 positions). Input position ``t``,
which predicts code ``t``, gets a conditioning embedding added to its token embedding: the sum of one learned
vector per slot of the ``k x k`` window of upper codes centred on code ``t``'s upper position
(``(i * Hc // H, j * Wc // W)``; slots outside the grid hold a padding code). Position ``t`` thus sees the
windows of codes ``0 .. t``, never an upper code outside them (the receptive field grows with the raster
order, not with the grid), and its attention costs ``T`` positions, not ``P + T``.

Sampling (``begin`` / ``step``): with the key/value cache the prefix is run once and each step feeds only
the code sampled at the previous position; without it every step recomputes the whole sequence so far
(the slow baseline). Both give the same logits up to float rounding. The cache is transformers' ``DynamicCache``
(grown by one position per step) or, with ``Decoding(kv_cache="static")``, its ``StaticCache`` preallocated to the
``P + T`` positions the network sees, so every step has the same shapes and ``Decoding(compile=True)`` can
``torch.compile`` the one-code step once (the prefix runs eagerly: it has its own shape and runs once per grid).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, StaticCache

from pipeline.priors.base import Decoding, Prior

ARCHS = ("gpt2", "llama")


def window_index(grid: tuple[int, int], cond_grid: tuple[int, int], k: int) -> torch.Tensor:
    """(H*W, k*k) indices into the flattened upper grid of the k x k window around each lower code's upper
    position (row i*Hc//H, column j*Wc//W), raster order in both; a slot outside the upper grid holds Hc*Wc
    (the padding entry appended after the grid)."""
    (h, w), (hc, wc), r = grid, cond_grid, k // 2
    offsets = torch.arange(-r, r + 1)  # (k,)
    rows = (torch.arange(h) * hc // h)[:, None] + offsets  # (H, k)
    cols = (torch.arange(w) * wc // w)[:, None] + offsets  # (W, k)
    rows, cols = rows[:, None, :, None].expand(h, w, k, k), cols[None, :, None, :].expand(h, w, k, k)
    inside = (rows >= 0) & (rows < hc) & (cols >= 0) & (cols < wc)  # (H, W, k, k)
    return torch.where(inside, rows * wc + cols, hc * wc).reshape(h * w, k * k)


@dataclass
class _GPTState:
    """Autoregressive sampling state: the tokens fed so far, and the key/value cache when one is used."""

    use_cache: bool
    tokens: torch.Tensor  # (B, L) the prefix, then (without the cache) every code fed so far
    window: torch.Tensor | None  # (B, T, n_embd) conditioning embeddings of every position (cond_window only)
    past: Any = None  # transformers Cache after the tokens above (use_cache only)
    decode: Callable[..., torch.Tensor] | None = None  # _decode_step or its compiled form (use_cache only)
    first_logits: torch.Tensor | None = None  # (B, K) logits for t = 0, computed with the prefix (use_cache)
    next_t: int = 0


class GPTPrior(Prior):
    """Autoregressive prior over one level's codes with a Hugging Face causal LM (GPT-2 or Llama) backbone."""

    def __init__(
        self,
        grid: tuple[int, int],
        num_codes: int,
        num_classes: int = 0,
        cond_grid: tuple[int, int] | None = None,
        cond_num_codes: int = 0,
        arch: str = "gpt2",
        n_layer: int = 4,
        n_embd: int = 128,
        n_head: int = 4,
        dropout: float = 0.0,
        cond_window: int = 0,
    ) -> None:
        """Build the prior from a config (random weights).

        Args:
            grid: (H, W) of the modelled level.
            num_codes: K, codebook size of the modelled level.
            num_classes: number of classes C (0 = unconditional; labels are then ignored).
            cond_grid: (Hc, Wc) of the conditioning level (the top grid, for the bottom prior); None for the
                top prior.
            cond_num_codes: codebook size of the conditioning level (required > 0 with ``cond_grid``).
            arch: "gpt2" (GPT2LMHeadModel: learned positions, LayerNorm, GELU) or "llama"
                (LlamaForCausalLM: rotary positions, RMSNorm, SwiGLU).
            n_layer: number of transformer blocks.
            n_embd: hidden size (must be divisible by ``n_head``).
            n_head: number of attention heads.
            dropout: dropout probability (embeddings, residual and attention for gpt2; attention for llama).
            cond_window: odd k: condition each code on the k x k upper codes around it, added to its input
                embedding, instead of a prefix of the whole upper grid (0); needs ``cond_grid``.
        """
        super().__init__(grid, num_codes, num_classes, cond_grid, cond_num_codes)
        if arch not in ARCHS:
            raise ValueError(f"arch={arch!r}: must be one of {', '.join(repr(a) for a in ARCHS)}")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: must be in [0, 1)")
        if cond_window < 0 or (cond_window and (cond_window % 2 == 0 or self.cond_grid is None)):
            raise ValueError(f"cond_window={cond_window}: must be 0 or odd, and > 0 only with cond_grid")
        self.arch, self.cond_window = arch, cond_window
        prefix_codes = 0 if self.cond_grid is None or cond_window else self.cond_grid[0] * self.cond_grid[1]

        self.cond_offset = self.num_codes  # first id of the conditioning-level codes (prefix conditioning)
        self.class_offset = self.num_codes + (self.cond_num_codes if prefix_codes else 0)  # class_offset + C = null
        self.null_token = self.class_offset + self.num_classes
        self.vocab_size = self.null_token + 1
        self.prefix_len = 1 + prefix_codes
        self.n_positions = self.prefix_len - 1 + self.seq_len  # positions the network ever sees

        config, model_cls = _network_config(arch, self.vocab_size, self.null_token, self.n_positions, n_layer,
                                            n_embd, n_head, dropout)
        self.model = model_cls._from_config(config, attn_implementation="sdpa")
        if cond_window:
            self.window_embed = nn.EmbeddingBag(cond_window**2 * (self.cond_num_codes + 1), n_embd, mode="sum")
            nn.init.normal_(self.window_embed.weight, std=0.02)  # the scale of the token embeddings
            self.register_buffer("window_index", window_index(self.grid, self.cond_grid, cond_window), persistent=False)

    # ----------------------------------------------------------------------------------------------- helpers

    def num_parameters(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())

    def cache_bytes_per_grid(self, dtype: torch.dtype | None = None) -> int:
        """The key/value cache of one sequence once every position is fed: 2 (keys and values) x layers x positions
        x width x bytes per element of ``dtype`` (default: the weights'; Llama here has as many key/value heads as
        heads)."""
        cfg, size = self.model.config, (dtype or self.model.dtype).itemsize
        return 2 * cfg.num_hidden_layers * self.n_positions * cfg.hidden_size * size

    @property
    def _param_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _prefix(
        self, batch: int, labels: torch.Tensor | None, cond_codes: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditions: (B, prefix_len) prefix ids (class or null token, then the conditioning codes as offset
        ids unless windowed) and, with ``cond_window``, the (B, T, n_embd) window embeddings (else None)."""
        device = self._param_device
        if self.num_classes == 0 or labels is None:
            first = torch.full((batch, 1), self.null_token, dtype=torch.long, device=device)
        else:
            labels = labels.to(device=device, dtype=torch.long).view(-1)
            if labels.shape[0] != batch:
                raise ValueError(f"labels have batch {labels.shape[0]}, expected {batch}")
            if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
                raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} = null)")
            first = (labels + self.class_offset)[:, None]
        if self.cond_grid is None:
            return first, None
        if cond_codes is None:
            raise ValueError(f"this prior is conditioned on a {self.cond_grid} code grid: pass cond_codes")
        if tuple(cond_codes.shape) != (batch, *self.cond_grid):
            expected = (batch, *self.cond_grid)
            raise ValueError(f"cond_codes have shape {tuple(cond_codes.shape)}, expected {expected}")
        cond = cond_codes.to(device=device, dtype=torch.long).reshape(batch, -1)
        if self.cond_window:
            return first, self._window_embeddings(cond)
        return torch.cat([first, cond + self.cond_offset], dim=1), None

    def _window_embeddings(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, T, n_embd): for each position, the sum over the k x k window slots of one learned vector per (slot,
        upper code) -- a linear map of the window's one-hot codes, without building them."""
        batch, slots = cond.shape[0], self.cond_window**2
        padded = F.pad(cond, (0, 1), value=self.cond_num_codes)  # (B, P + 1): the padding code last
        codes = padded[:, self.window_index]  # (B, T, k*k)
        offsets = torch.arange(slots, device=cond.device) * (self.cond_num_codes + 1)  # each slot its own table
        return self.window_embed((codes + offsets).flatten(0, 1)).view(batch, self.seq_len, -1)

    def _inputs(self, tokens: torch.Tensor, window: torch.Tensor | None, start: int) -> dict[str, torch.Tensor]:
        """The network's inputs for ``tokens`` (B, L) at input positions ``start .. start + L - 1``: their ids, or
        with windowed conditioning their embeddings plus those positions' window embeddings."""
        if window is None:
            return {"input_ids": tokens}
        embeds = self.model.get_input_embeddings()(tokens)  # (B, L, n_embd)
        return {"inputs_embeds": embeds + window[:, start : start + tokens.shape[1]].to(embeds.dtype)}

    def _code_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.num_codes]

    # -------------------------------------------------------------------------------------- Prior interface

    def forward(
        self,
        codes: torch.Tensor,
        labels: torch.Tensor | None = None,
        cond_codes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, H*W, K), teacher forcing: ``logits[:, t]`` predicts ``codes[:, t]`` (raster order)."""
        batch = codes.shape[0]
        if tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"codes have shape {tuple(codes.shape)}, expected (B, *{self.grid})")
        prefix, window = self._prefix(batch, labels, cond_codes)
        flat = codes.to(device=prefix.device, dtype=torch.long).reshape(batch, -1)
        tokens = torch.cat([prefix, flat[:, :-1]], dim=1)  # (B, P + T): the last code is never an input
        out = self.model(**self._inputs(tokens, window, 0), use_cache=False, logits_to_keep=self.seq_len)
        return self._code_logits(out.logits)

    def begin(
        self,
        batch: int,
        labels: torch.Tensor | None,
        cond_codes: torch.Tensor | None,
        use_cache: bool = True,
        decoding: Decoding | None = None,
    ) -> _GPTState:
        """Build the prefix; with ``use_cache`` run it once, keeping the key/value cache (``decoding.kv_cache``) and
        t = 0 logits."""
        decoding = decoding or Decoding()
        prefix, window = self._prefix(batch, labels, cond_codes)
        state = _GPTState(use_cache=use_cache, tokens=prefix, window=window,
                          decode=_compiled_decode_step() if decoding.compile else _decode_step)
        if use_cache:
            out = self.model(**self._inputs(prefix, window, 0), cache=self.new_cache(decoding.kv_cache),
                             use_cache=True, logits_to_keep=1)
            state.past = out.cache
            state.first_logits = self._code_logits(out.logits[:, -1])
        return state

    def step(self, state: _GPTState, t: int, prev: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K) for raster position ``t``; ``prev`` (B,) = code sampled at ``t - 1`` (None at 0)."""
        if t != state.next_t:
            raise ValueError(f"step called with t={t}, expected t={state.next_t} (steps must run in order)")
        if not 0 <= t < self.seq_len:
            raise ValueError(f"t={t}: must be in [0, {self.seq_len})")
        state.next_t = t + 1
        if t == 0:
            if state.use_cache:
                logits = state.first_logits
                state.first_logits = None
                return logits
            new = None
        else:
            if prev is None:
                raise ValueError(f"step t={t} needs the previous code (prev)")
            new = prev.to(device=state.tokens.device, dtype=torch.long).view(-1, 1)
            if not state.use_cache:
                state.tokens = torch.cat([state.tokens, new], dim=1)
        if state.use_cache:  # the cache object is updated in place
            inputs = self._inputs(new, state.window, self.prefix_len - 1 + t)
            return self._code_logits(state.decode(self.model, inputs, state.past))
        # baseline: recompute the whole sequence so far
        out = self.model(**self._inputs(state.tokens, state.window, 0), use_cache=False, logits_to_keep=1)
        return self._code_logits(out.logits[:, -1])

    def new_cache(self, kind: str) -> Cache:
        """An empty key/value cache of ``kind`` (``Decoding.kv_cache``): a ``DynamicCache``, or a ``StaticCache`` of
        ``n_positions``, whose keys and values (B, heads, n_positions, head size) per layer are allocated at the
        first forward, the bytes ``cache_bytes_per_grid`` counts when every position is fed."""
        if kind == "static":
            return StaticCache(config=self.model.config, max_cache_len=self.n_positions)
        return DynamicCache(config=self.model.config)


def _decode_step(model: nn.Module, inputs: dict[str, torch.Tensor], cache: Cache) -> torch.Tensor:
    """One position through the network, its keys and values written into ``cache``: (B, vocab) logits."""
    return model(**inputs, cache=cache, use_cache=True).logits[:, -1]


@functools.cache
def _compiled_decode_step() -> Callable[..., torch.Tensor]:
    """``_decode_step`` under ``torch.compile``, made once per process. Dynamo treats the model's weights as inputs,
    so its graphs are keyed on shapes and dtypes, not on the model object: every prior of one shape (and the
    bfloat16 copies made for each sampling call) reuses them; a new batch size, level or dtype compiles again."""
    return torch.compile(_decode_step, dynamic=False)


def _network_config(arch: str, vocab_size: int, bos: int, n_positions: int, n_layer: int, n_embd: int,
                    n_head: int, dropout: float):
    """The ``transformers`` config and model class of a GPT prior's network: GPT-2 or Llama."""
    common = dict(
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=None,
        pad_token_id=None,  # fixed-length sequences, no padding (and no "pad id == start id" warning)
        use_cache=True,
    )
    if arch == "gpt2":
        return GPT2Config(n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, **common), GPT2LMHeadModel
    # SwiGLU width ~ 8/3 * n_embd (rounded up to a multiple of 32): ~ the parameters of a 4x GELU MLP
    intermediate = 32 * math.ceil(8 * n_embd / 3 / 32)
    return LlamaConfig(hidden_size=n_embd, intermediate_size=intermediate, num_hidden_layers=n_layer,
                       num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=n_positions,
                       attention_dropout=dropout, tie_word_embeddings=False, **common), LlamaForCausalLM
