"""A GPU plan on paper: from a config, the code grids and prior sequences, the parameter counts, the memory per
GPU for training (DDP and FSDP) and for KV-cached sampling, and the throughput to expect, so the plan can be
reprinted whenever the config changes (``python -m pipeline.plan --config configs/imagenet256.yaml``).

Everything here is arithmetic on the config; no model is trained and nothing is allocated (the parameter
counts are checked against models built on the ``meta`` device). Every assumption is a named constant below
or a flag, and the printed plan lists them. The formulas, per image (micro-batch = images per GPU):

* grids and networks: the config's own accessors, as the stages use them (``VQVAEConfig.level_downsampling``,
  ``PriorConfig.net_for`` and ``window_for``), so the plan is of the models ``make stage1 stage2`` builds.
* transformer parameters: gpt2 ``V d + S d + L (12 d^2 + 13 d) + 2 d`` (tied head); llama ``2 V d +
  L (4 d^2 + 3 d I + 2 d) + d``, ``I`` = SwiGLU width; V = vocabulary (without the upper codes when windowed),
  S = positions; a ``k x k`` conditioning window adds ``k^2 (Kc + 1) d`` (``pipeline.priors.gpt``).
* transformer training FLOPs: ``6 N S + 12 L d S^2`` with N the weights of matmuls (blocks + head): the
  6 N S of Kaplan et al. 2020 plus attention counted over the whole sequence as in PaLM's MFU (Chowdhery et
  al. 2022, app. B).
* transformer activations: ``c S d L`` bytes plus the logits. Korthikanti et al. 2022 give c = 34 for a
  model run wholly in 16 bits with flash attention; under autocast (``bf16-mixed``) the residual stream and the
  norms stay in fp32, and the saved tensors of this code's priors measure c = 60 (gpt2, +2 for its dropout
  masks) and 56 (llama) on CPU autocast with flash attention (tests/test_plan.py checks it). With activation
  checkpointing per block: ``4 S d L + c S d`` (fp32 block inputs plus one block recomputed). A gated
  PixelCNN saves 32 bytes per position x channel x layer (measured 31).
* KV cache for sampling: ``2 L S d`` values of ``sample.dtype`` per sequence (keys and values of every position
  fed), twice the sequences with classifier-free guidance, and the batch lowered to fit ``sample.max_kv_gib`` as
  the sampler lowers it (``pipeline.sampling``); a PixelCNN keeps a few rows per layer.
* VQ-VAE: every convolution walked as ``pipeline.vqvae`` builds it (``vqvae_layers``): parameters, FLOPs
  ``2 x outputs x c_in x k^2`` (input positions for a transposed convolution, as ``torch.utils.flop_counter``
  counts), activations = every convolution and ReLU output; training = 3 x forward.
* training memory: mixed precision keeps fp32 weights (they are the master copy), fp32 gradients and
  AdamW's two fp32 moments: 16 bytes per parameter. DDP adds its fp32 gradient buckets and autocast's bf16
  weight copies; FSDP (``FULL_SHARD``) divides the 16 bytes by the GPUs but gathers the whole model in bf16
  for the forward and backward (no auto-wrap policy in ``pipeline.fabric``: one FSDP unit), with its bf16
  gradients unsharded until the reduce-scatter.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config

GIB = 2**30
PEAK_TFLOPS = {"h100": 989.0, "a100": 312.0}  # bf16 dense tensor-core peak (SXM), TFLOP/s
HBM_TBPS = {"h100": 3.35, "a100": 2.04}  # memory bandwidth (SXM), TB/s: bounds KV-cached sampling
MFU = 0.4  # model FLOPs utilisation assumed for training
GPU_GIB = 80  # memory per GPU
RESERVE_GIB = 4  # CUDA context, allocator fragmentation and NCCL buffers, kept free
BF16, FP32 = 2, 4  # bytes
WEIGHT_BYTES, GRAD_BYTES, ADAMW_BYTES = 4, 4, 8  # per parameter: fp32 weights (the master copy), fp32 gradients,
# AdamW's two fp32 moments (autocast mixed precision keeps the weights in fp32: no separate master copy)
DDP_EXTRA_BYTES = 6  # per parameter: DDP's fp32 gradient buckets 4 + autocast's cached bf16 weights 2
FSDP_GATHER_BYTES = 4  # per parameter, whole model (one FSDP unit): bf16 gathered weights 2 + bf16 gradients 2
ACT_COEF = {"gpt2": 62, "llama": 56}  # saved bytes per position x width x block under bf16 autocast (measured)
CKPT_INPUT_BYTES = 4  # per position x width x block with activation checkpointing: the fp32 residual stream
LOGIT_BYTES = 10  # per logit: bf16 output 2 + fp32 copy for the cross-entropy 4 + its gradient 4
PIXELCNN_ACT_COEF = 32  # saved bytes per position x channel x gated layer under bf16 autocast (measured: 31)


# ---------------------------------------------------------------------------------------------------------
# the config's geometry


def grid_sides(cfg: Config) -> list[int]:
    """Side of each level's square code grid, top first: the image side over the level's total downsampling,
    ``VQVAEConfig.level_downsampling``, the function ``VQVAE2.grid_shapes`` reads too (one source for both)."""
    return [cfg.data.image_size // d for d in cfg.vqvae.level_downsampling()]


# ---------------------------------------------------------------------------------------------------------
# priors


@dataclass
class PriorShape:
    """What a prior's size depends on besides its network: the grids, codebooks and classes."""

    name: str
    side: int  # modelled grid is side x side
    num_codes: int
    num_classes: int
    cond_side: int = 0  # upper grid side (0 = top prior)
    cond_num_codes: int = 0
    window: int = 0  # the level's conditioning window, PriorConfig.window_for (0: none or the whole upper grid)

    @property
    def tokens(self) -> int:
        return self.side**2

    @property
    def prefix_codes(self) -> int:
        """Upper codes in the sequence: the whole upper grid, unless windowed (then they are added embeddings)."""
        return self.cond_side**2 if self.cond_side and not self.window else 0

    @property
    def prefix(self) -> int:
        """Tokens before the codes: the class token, then the upper grid's codes (``prefix_codes``)."""
        return 1 + self.prefix_codes

    @property
    def positions(self) -> int:
        """Positions the network sees per image (the last code is never an input); also the KV cache length."""
        return self.prefix - 1 + self.tokens

    @property
    def vocab(self) -> int:
        """A GPT's vocabulary: its codes, the upper codes when they are in the sequence, classes, the null token."""
        return self.num_codes + (self.cond_num_codes if self.prefix_codes else 0) + self.num_classes + 1


def llama_intermediate(d: int) -> int:
    return 32 * math.ceil(8 * d / 3 / 32)  # as pipeline.priors.gpt


def gpt_params(net, s: PriorShape) -> tuple[int, int]:
    """(all parameters, weights of matmuls) of a GPT prior. A windowed one adds a table of one vector per window
    slot and upper code (or padding): k^2 (Kc + 1) d, gathered and summed, not a matmul (``pipeline.priors.gpt``)."""
    d, layers, v = net.n_embd, net.n_layer, s.vocab
    window = s.window**2 * (s.cond_num_codes + 1) * d
    if net.arch == "gpt2":
        blocks = layers * (12 * d * d + 13 * d)
        return v * d + s.positions * d + blocks + 2 * d + window, layers * 12 * d * d + v * d
    i = llama_intermediate(d)
    return 2 * v * d + layers * (4 * d * d + 3 * d * i + 2 * d) + d + window, layers * (4 * d * d + 3 * d * i) + v * d


def pixelcnn_params(net, s: PriorShape) -> int:
    """Parameters of a gated PixelCNN prior (``pipeline.priors.pixelcnn``)."""
    c, k, p, cc, n = net.channels, net.kernel_size, net.kernel_size // 2, net.cond_channels, net.layers
    layer = (c * 2 * c * (p + 1) * k + 2 * c) + (4 * c * c + 2 * c) + (c * 2 * c * (p + 1) + 2 * c) + 2 * (c * c + c)
    total = s.num_codes * c + n * layer + (c * c + c) + (c * s.num_codes + s.num_codes)
    if s.num_classes:
        total += (s.num_classes + 1) * n * 4 * c
    if s.cond_side:
        conv3 = cc * cc * 9 + cc
        total += s.cond_num_codes * cc + 2 * conv3 + net.cond_res_blocks * (conv3 + cc * cc + cc)
        total += cc * n * 4 * c + n * 4 * c
    return total


@dataclass
class PriorPlan:
    shape: PriorShape
    net: Any
    params: int
    flops: float  # training FLOPs per image
    act: float  # activation bytes per image, no checkpointing
    act_ckpt: float  # with activation checkpointing per block
    kv: float  # sampling state bytes per sequence (KV cache for a GPT) in the sampling dtype


def plan_prior(net, s: PriorShape, state_bytes: int) -> PriorPlan:
    """Parameters, training FLOPs, activations and sampling state (``state_bytes`` per element: ``sample.dtype``'s)
    of one prior, per image."""
    if net.kind == "gpt":
        params, matmul = gpt_params(net, s)
        d, layers, n = net.n_embd, net.n_layer, s.positions
        flops = 6 * (matmul - s.vocab * d) * n + 6 * s.vocab * d * s.tokens + 12 * layers * d * n * n
        logits = s.tokens * s.vocab * LOGIT_BYTES  # the network's logits cover the whole vocabulary
        coef = ACT_COEF[net.arch]
        act, act_ckpt = coef * n * d * layers + logits, CKPT_INPUT_BYTES * n * d * layers + coef * n * d + logits
        return PriorPlan(s, net, params, flops, act, act_ckpt, kv_cache_bytes(layers, d, n, state_bytes))
    params = pixelcnn_params(net, s)
    c, n = net.channels, s.tokens
    flops = 6 * (params - s.num_codes * c) * n  # every conv weight at every position: an upper bound
    act = PIXELCNN_ACT_COEF * c * n * net.layers + s.tokens * s.num_codes * LOGIT_BYTES
    return PriorPlan(s, net, params, flops, act, act, pixelcnn_state_bytes(net, s, state_bytes))


def pixelcnn_state_bytes(net, s: PriorShape, dtype_bytes: int) -> int:
    """Bytes of a PixelCNN's row-cached sampling state per sequence (``pipeline.priors.pixelcnn._SamplingState``):
    the canvas (int64), the conditioning features, the label biases, and per layer the last k // 2 input rows,
    the current row's vertical-to-horizontal input and its gate biases."""
    c, layers, width, cond = net.channels, net.layers, s.side, bool(s.cond_side)
    per_layer_row = c * (net.kernel_size // 2) * width + 2 * c * width
    gate_bias_row = 4 * c * (width if cond else 1) if cond or s.num_classes else 0
    elements = (net.cond_channels * s.tokens if cond else 0) + (layers * 4 * c if s.num_classes else 0) \
        + layers * (per_layer_row + gate_bias_row)
    return elements * dtype_bytes + 8 * s.tokens


def kv_cache_bytes(layers: int, n_embd: int, length: int, dtype_bytes: int, sequences: int = 1) -> int:
    """Bytes of a full KV cache: keys and values of every layer for ``length`` positions of each sequence."""
    return 2 * layers * length * n_embd * dtype_bytes * sequences


def prior_shapes(cfg: Config, num_classes: int) -> list[PriorShape]:
    """One prior per level, top first; each lower one conditioned on the level above."""
    from pipeline.vqvae import level_names

    k, sides, names = cfg.vqvae.codebook_size, grid_sides(cfg), level_names(cfg.vqvae.levels)
    return [PriorShape(name, sides[i], k, num_classes, sides[i - 1] if i else 0, k if i else 0,
                       cfg.prior.window_for(name)) for i, name in enumerate(names)]


def built_prior_params(net, s: PriorShape) -> int:
    """Parameters of the prior as the code builds it, on the meta device (nothing allocated)."""
    import torch

    from pipeline.priors import build_prior

    with torch.device("meta"):
        prior = build_prior(net, (s.side, s.side), s.num_codes, s.num_classes,
                            (s.cond_side, s.cond_side) if s.cond_side else None, s.cond_num_codes, s.window)
    return sum(p.numel() for p in prior.parameters())


# ---------------------------------------------------------------------------------------------------------
# the VQ-VAE


@dataclass
class Layer:
    kind: str  # conv | convT | relu
    c_in: int
    c_out: int
    k: int
    side_in: int
    side_out: int

    @property
    def params(self) -> int:
        return 0 if self.kind == "relu" else self.c_in * self.c_out * self.k**2 + self.c_out

    @property
    def flops(self) -> int:
        positions = self.side_in**2 if self.kind == "convT" else self.side_out**2
        return 0 if self.kind == "relu" else 2 * positions * self.c_in * self.c_out * self.k**2

    @property
    def outputs(self) -> int:
        return self.c_out * self.side_out**2


def _conv(c_in, c_out, k, side_in, stride=1, transposed=False) -> Layer:
    side_out = side_in * stride if transposed else side_in // stride
    return Layer("convT" if transposed else "conv", c_in, c_out, k, side_in, side_out)


def _relu(c, side) -> Layer:
    return Layer("relu", c, c, 0, side, side)


def _res_blocks(ch, rc, n, side) -> list[Layer]:
    return [x for _ in range(n) for x in (_relu(ch, side), _conv(ch, rc, 3, side), _relu(rc, side),
                                          _conv(rc, ch, 1, side))]


def _encoder_layers(c_in, ch, rc, nr, stride, side) -> list[Layer]:
    """``pipeline.vqvae._encoder``: log2(stride) 4x4 stride-2 convolutions (widths ch/2, ch, ch, ...)."""
    layers, n = [], int(math.log2(stride))
    for j in range(n):
        layers += [_conv(c_in if j == 0 else (ch // 2 if j == 1 else ch), ch // 2 if j == 0 else ch, 4, side, 2)]
        side //= 2
        layers.append(_relu(layers[-1].c_out, side))
    layers.append(_conv(ch // 2 if n == 1 else ch, ch, 3, side))
    return layers + _res_blocks(ch, rc, nr, side) + [_relu(ch, side)]


def _decoder_layers(c_in, c_out, ch, rc, nr, stride, side) -> list[Layer]:
    """``pipeline.vqvae._decoder``: log2(stride) 4x4 stride-2 transposed convolutions (widths ..., ch, ch/2, c_out)."""
    layers = [_conv(c_in, ch, 3, side)] + _res_blocks(ch, rc, nr, side) + [_relu(ch, side)]
    n = int(math.log2(stride))
    widths = [ch] * max(n - 2, 0) + ([ch, ch // 2] if n >= 2 else [ch]) + [c_out]
    for j in range(n):
        layers.append(_conv(widths[j], widths[j + 1], 4, side, 2, transposed=True))
        side *= 2
        if j < n - 1:
            layers.append(_relu(widths[j + 1], side))
    return layers


def vqvae_layers(cfg: Config) -> list[Layer]:
    """Every convolution and ReLU of the VQ-VAE-2 forward pass, in ``pipeline.vqvae.VQVAE2``'s order."""
    v, strides = cfg.vqvae, cfg.vqvae.level_strides()
    ch, rc, nr, dim, n = v.channels, v.res_channels, v.res_blocks, v.code_dim, v.levels
    sides = grid_sides(cfg)[::-1]  # bottom first, as inside VQVAE2
    layers = _encoder_layers(cfg.data.channels, ch, rc, nr, strides[0], cfg.data.image_size)
    for i in range(1, n):
        layers += _encoder_layers(ch, ch, rc, nr, strides[i], sides[i - 1])
    for i in reversed(range(n)):
        layers.append(_conv(ch + (dim if i < n - 1 else 0), dim, 1, sides[i]))
        if i > 0:
            layers += _decoder_layers(dim * (1 if i == n - 1 else 2), dim, ch, rc, nr, strides[i], sides[i])
    for i in range(1, n):  # upsamplers of each level to the bottom grid
        side = sides[i]
        while side < sides[0]:
            layers.append(_conv(dim, dim, 4, side, 2, transposed=True))
            side *= 2
            if side < sides[0]:
                layers.append(_relu(dim, side))
    return layers + _decoder_layers(dim * n, cfg.data.channels, ch, rc, nr, strides[0], sides[0])


@dataclass
class Stage1Plan:
    params: int
    flops: float  # training FLOPs per image
    act: float  # activation bytes per image (bf16 feature maps, fp32 quantizer distances)


def plan_stage1(cfg: Config) -> Stage1Plan:
    layers, v = vqvae_layers(cfg), cfg.vqvae
    codebooks = v.levels * v.codebook_size * v.code_dim if v.quantizer == "loss" else 0  # EMA: buffers
    sides = grid_sides(cfg)
    distances = max(sides) ** 2 * v.codebook_size * FP32 * 2  # the largest level's (N, K) distances, transient
    dist_flops = sum(2 * s * s * v.codebook_size * v.code_dim for s in sides)
    act = sum(x.outputs for x in layers) * BF16 + distances
    return Stage1Plan(sum(x.params for x in layers) + codebooks, 3 * (sum(x.flops for x in layers) + dist_flops), act)


def built_vqvae_params(cfg: Config) -> int:
    """Parameters of the VQ-VAE as the code builds it (meta device: nothing allocated)."""
    import torch

    from pipeline.vqvae import VQVAE2

    with torch.device("meta"):
        model = VQVAE2(cfg.vqvae, cfg.data.channels)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# memory and throughput


@dataclass
class Assumptions:
    gpu: str = "h100"
    mfu: float = MFU
    gpu_gib: float = GPU_GIB
    gpus: int = 8
    epoch_images: int = 0
    classes: int = 0  # with prior.class_conditional

    def lines(self) -> list[str]:
        return [f"GPU: {self.gpus} x {self.gpu.upper()} {self.gpu_gib:g} GiB, bf16 dense peak "
                f"{PEAK_TFLOPS[self.gpu]:g} TFLOP/s, HBM {HBM_TBPS[self.gpu]:g} TB/s; MFU {self.mfu:g} (training); "
                f"{RESERVE_GIB} GiB kept free per GPU",
                f"training bytes per parameter: fp32 weights {WEIGHT_BYTES} + fp32 grads {GRAD_BYTES} + AdamW "
                f"{ADAMW_BYTES} (2 fp32 moments); DDP +{DDP_EXTRA_BYTES} (fp32 grad buckets, autocast bf16 weights); "
                f"FSDP shards the first three over the GPUs, +{FSDP_GATHER_BYTES} (whole model gathered in bf16, "
                "bf16 grads: pipeline.fabric sets no auto-wrap policy)",
                "activations: " + " / ".join(f"{c} ({arch})" for arch, c in ACT_COEF.items()) + " bytes x positions "
                f"x width x blocks (bf16 autocast, flash attention) + logits {LOGIT_BYTES} B each; VQ-VAE: bf16 "
                f"conv/ReLU outputs + fp32 code distances; PixelCNN {PIXELCNN_ACT_COEF} x positions x C x layers. "
                "(ckpt) = activation checkpointing per block, which the training loop does not do yet",
                "FLOPs: 6 N S + 12 L d S^2 per image (PaLM's MFU convention), VQ-VAE 3 x forward conv FLOPs; "
                f"epoch = {self.epoch_images:,} images"]


def train_memory(params: int, act_per_image: float, batch: int, gpus: int, strategy: str) -> dict[str, float]:
    """Bytes per GPU for training, by part: DDP keeps everything on every GPU, FSDP shards the fp32 state."""
    shards = 1 if strategy == "ddp" else gpus
    extra = (DDP_EXTRA_BYTES if strategy == "ddp" else FSDP_GATHER_BYTES) * params
    return {"weights": WEIGHT_BYTES * params / shards, "grads": GRAD_BYTES * params / shards,
            "adamw": ADAMW_BYTES * params / shards, "extra": extra, "activations": act_per_image * batch}


def images_per_second(flops_per_image: float, a: Assumptions) -> float:
    return a.gpus * PEAK_TFLOPS[a.gpu] * 1e12 * a.mfu / flops_per_image


def sample_dtype_bytes(cfg: Config) -> int:
    """Bytes per element of ``sample.dtype``: the sampled priors' weights and their key/value caches."""
    import torch

    return getattr(torch, cfg.sample.dtype).itemsize


def is_guided(cfg: Config, num_classes: int) -> bool:
    """Whether sampling doubles its sequences for classifier-free guidance (``pipeline.sampling.is_guided``)."""
    return cfg.sample.guidance != 1.0 and num_classes > 0 and cfg.sample.labels != "none"


def kv_batch_limit(cfg: Config, plans: list[PriorPlan], guided: bool) -> int | None:
    """The most images whose largest GPT key/value cache fits ``sample.max_kv_gib`` (0 when not one does), as
    ``pipeline.sampling.cache_batch_limit`` counts it; None without a budget or without a GPT (a PixelCNN's
    rows are not counted)."""
    per_image = max((p.kv for p in plans if p.net.kind == "gpt"), default=0) * (2 if guided else 1)
    if not cfg.sample.max_kv_gib or not per_image:
        return None
    return int(cfg.sample.max_kv_gib * GIB // per_image)


def sampling_batch(cfg: Config, plans: list[PriorPlan], guided: bool) -> int:
    """Images per sampling batch, as ``Sampler.kv_batch_size`` picks it: ``sample.batch_size``, lowered to what
    ``sample.max_kv_gib`` holds (at least 1 here; sampling itself stops with an error when not one image fits)."""
    limit = kv_batch_limit(cfg, plans, guided)
    return cfg.sample.batch_size if limit is None else max(1, min(cfg.sample.batch_size, limit))


def sampling_weight_bytes(cfg: Config, prior_params: int, vqvae_params: int) -> int:
    """Weights on a GPU while sampling: the sampler keeps its fp32 priors and VQ-VAE, plus the priors' copies in
    ``sample.dtype`` when it is not float32 (``Sampler.priors_in``)."""
    copies = sample_dtype_bytes(cfg) * prior_params if sample_dtype_bytes(cfg) != FP32 else 0
    return FP32 * (prior_params + vqvae_params) + copies


def decode_seconds_per_image(plans: list[PriorPlan], batch: int, guided: bool, a: Assumptions,
                             weight_bytes: int) -> float:
    """KV-cached sampling on one GPU is bound by memory bandwidth: each step reads the weights once
    (``weight_bytes`` per parameter) and the cache of every sequence (half full on average after the prefix)."""
    rows, total = batch * (2 if guided else 1), 0.0
    for p in plans:
        average_cache = p.kv * (p.shape.prefix + p.shape.tokens / 2) / max(p.shape.positions, 1)
        total += p.shape.tokens * (weight_bytes * p.params + rows * average_cache) / (HBM_TBPS[a.gpu] * 1e12)
    return total / batch


if __name__ == "__main__":  # the printed plan lives in pipeline.plan_report
    from pipeline.plan_report import main

    sys.exit(main())
