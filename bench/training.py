"""Benchmarks 2 and 3: training throughput of the VQ-VAE-2 (images/s) and of the priors (tokens/s), one
optimiser step at a time as in ``pipeline.training.fit`` (forward, loss, backward, gradient clipping, AdamW)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import ROOT, Context, Result, Row, Timing, compare, failure, scaled, time_interleaved

CONFIG = ROOT / "configs" / "mnist.yaml"
BATCH = 64


def _optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


# --------------------------------------------------------------------------------------------------- stage 1


def _stage1_batches(cfg, device: torch.device, n: int = 8) -> list[torch.Tensor]:
    """``n`` batches of real training images (k-means init and dead-code restarts then behave as in a run)."""
    from pipeline.data import load_image_data, to_float

    data = load_image_data(cfg.data)
    return [to_float(data.train.__getitems__(list(range(i * BATCH, (i + 1) * BATCH)))[0]).to(device)
            for i in range(n)]


def _stage1_step(cfg, batches: list[torch.Tensor], device: torch.device, channels_last: bool = False,
                 bf16: bool = False, compile_model: bool = False) -> Callable[[], None]:
    from pipeline.vqvae import VQVAE2

    torch.manual_seed(0)
    model = VQVAE2(cfg.vqvae, in_channels=cfg.data.channels).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    opt = _adamw(model, cfg.stage1.lr, cfg.stage1.weight_decay)
    forward = torch.compile(model) if compile_model else model
    cycle = itertools.cycle(batches)

    def step() -> None:
        x = next(cycle)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(x)
        _optimizer_step(model, opt, out.loss)

    return step


def bench_stage1(ctx: Context) -> Result:
    from pipeline.config import load_config

    cfg = load_config(CONFIG)
    batches = _stage1_batches(cfg, ctx.device)
    warmup, repeats = (3, 7) if ctx.quick else (5, 15)
    variants = {
        "eager fp32 (NCHW)": {},
        "channels_last fp32": {"channels_last": True},
        "bf16 autocast (NCHW)": {"bf16": True},
    }
    if not ctx.quick:
        variants["torch.compile fp32 (NCHW)"] = {"compile_model": True}
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph-break warnings: counted below instead
    steps = {}
    for name, kwargs in variants.items():
        try:
            steps[name] = _stage1_step(cfg, batches, ctx.device, **kwargs)
        except Exception as exc:  # e.g. torch.compile unavailable on this platform
            steps[name] = exc
    timings: dict[str, Timing | str] = {n: failure(s) for n, s in steps.items() if isinstance(s, Exception)}
    timings.update(time_interleaved({n: s for n, s in steps.items() if not isinstance(s, Exception)}, ctx.device,
                                    warmup, repeats))
    base = scaled(timings["eager fp32 (NCHW)"], invert=BATCH)
    rows = []
    for name in variants:
        t = timings[name]
        note = ""
        if isinstance(t, Timing) and name.startswith("torch.compile"):
            from torch._dynamo.utils import counters

            breaks = sum(counters.get("graph_break", {}).values())
            note = (f"compilation: first call {t.warmup_times[0]:.1f} s, {len(t.warmup_times)} warm-up calls "
                    f"{sum(t.warmup_times):.1f} s; {breaks} graph break(s)")
        if name.startswith("eager"):
            rows.append(Row("stage1 train", name, scaled(t, invert=BATCH), None, "img/s",
                            note="the baseline of the stage1 ratios; configs/mnist.yaml trains channels_last fp32"))
        else:
            rows.append(compare("stage1 train", name, scaled(t, invert=BATCH), base, "img/s",
                                higher_is_better=True, note=note))
    if ctx.quick:
        rows.append(Row("stage1 train", "torch.compile fp32 (NCHW)", "skipped (full run only)"))
    settings = {"config": str(CONFIG.relative_to(ROOT)), "batch": BATCH, "image": "32x32x1 (embedded MNIST)",
                "warmup_steps": warmup, "repeats": repeats, "variants": list(variants),
                "step": "forward + loss + backward + clip_grad_norm(1.0) + AdamW"}
    details = {n: (t.to_dict() if isinstance(t, Timing) else t) for n, t in timings.items()}
    return Result(rows, settings, details)


# ---------------------------------------------------------------------------------------------------- priors


def prior_models(kind: str, device: torch.device):
    """(top prior, bottom prior) of the default config with ``kind`` (gpt | pixelcnn), freshly initialised:
    top 4x4 with class tokens, bottom 8x8 conditioned on the 4x4 top codes, K = 512, 10 classes."""
    from pipeline.config import load_config
    from pipeline.priors import build_prior

    cfg = load_config(CONFIG, [f"prior.top.kind={kind}", f"prior.bottom.kind={kind}"])  # another kind: its defaults
    top_net, bottom_net = cfg.prior.top, cfg.prior.bottom
    k = cfg.vqvae.codebook_size
    torch.manual_seed(0)
    top = build_prior(top_net, (4, 4), k, 10, None, 0).to(device)
    bottom = build_prior(bottom_net, (8, 8), k, 10, (4, 4), k).to(device)
    return top, bottom


def _prior_step(prior, device: torch.device, cond: bool) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(0)
    h, w = prior.grid
    codes = torch.randint(prior.num_codes, (BATCH, h, w), generator=gen).to(device)
    labels = torch.randint(prior.num_classes, (BATCH,), generator=gen)
    labels = torch.where(torch.rand(BATCH, generator=gen) < 0.1, prior.num_classes, labels).to(device)  # CFG drop
    cond_codes = torch.randint(prior.cond_num_codes, (BATCH, 4, 4), generator=gen).to(device) if cond else None
    opt = _adamw(prior, 1e-3, 0.01)
    prior.train()

    def step() -> None:
        logits = prior(codes, labels, cond_codes)  # (B, T, K)
        loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        _optimizer_step(prior, opt, loss)

    return step


def bench_priors(ctx: Context) -> Result:
    warmup, repeats = (2, 5) if ctx.quick else (3, 11)
    steps, tokens = {}, {}
    for kind, label in (("gpt", "GPT"), ("pixelcnn", "PixelCNN")):
        top, bottom = prior_models(kind, ctx.device)
        steps[f"{label} top 4x4 (+class)"] = _prior_step(top, ctx.device, cond=False)
        steps[f"{label} bottom 8x8 | top 4x4 (+class)"] = _prior_step(bottom, ctx.device, cond=True)
        tokens[f"{label} top 4x4 (+class)"] = BATCH * top.seq_len
        tokens[f"{label} bottom 8x8 | top 4x4 (+class)"] = BATCH * bottom.seq_len
    timings = time_interleaved(steps, ctx.device, warmup, repeats)
    rows = [Row("prior train", name, scaled(t, invert=tokens[name]), None, "tok/s") for name, t in timings.items()]
    settings = {"batch": BATCH, "num_codes": 512, "num_classes": 10, "class_dropout": 0.1, "warmup_steps": warmup,
                "repeats": repeats, "gpt": "gpt2, 4 layers, 128 wide, 4 heads (configs/mnist.yaml)",
                "pixelcnn": "PixelCNNPriorConfig defaults: 64 channels, 8 layers, kernel 5, cond 64 x 2 res blocks",
                "step": "teacher-forced forward + cross-entropy + backward + clip_grad_norm(1.0) + AdamW",
                "tokens": "predicted codes per step (B x H x W); the prefix of the bottom GPT is not counted"}
    details = {n: (t.to_dict() if isinstance(t, Timing) else t) for n, t in timings.items()}
    return Result(rows, settings, details)
