"""Benchmark 1: our ``VectorQuantizer`` against ``vector_quantize_pytorch.VectorQuantize`` at equal settings."""

from __future__ import annotations

import torch

from bench.common import Context, Result, Timing, compare, scaled, time_interleaved

SHAPES = [(64, 64, 8, 8), (64, 64, 32, 32)]  # (B, D, H, W)
CODEBOOK_SIZE, DIM, DECAY, BETA = 512, 64, 0.99, 0.25


def _models(device: torch.device):
    """Both quantizers with the same settings and the same starting codebook: EMA codebook (decay 0.99,
    eps 1e-5), commitment weight 0.25, plain straight-through gradients (the library's default rotation trick
    is off), no k-means init (both start initialised), no dead-code restarts."""
    from vector_quantize_pytorch import VectorQuantize

    from pipeline.quantizer import VectorQuantizer

    torch.manual_seed(0)
    ours = VectorQuantizer(CODEBOOK_SIZE, DIM, beta=BETA, kind="ema", decay=DECAY, eps=1e-5, kmeans_init=False,
                           restart_after=0)
    theirs = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, decay=DECAY, eps=1e-5, kmeans_init=False,
                            commitment_weight=BETA, accept_image_fmap=True, rotation_trick=False,
                            straight_through=False, threshold_ema_dead_code=0)
    with torch.no_grad():
        theirs.codebook = ours.codebook.clone()
    return ours.to(device), theirs.to(device)


def _same_codes(ours, theirs, x: torch.Tensor) -> float:
    """Fraction of positions both assign to the same code (eval mode: no codebook update)."""
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        a = ours(x).indices
        _, b, _ = theirs(x)
    ours.train()
    theirs.train()
    return float((a == b).float().mean())


def bench_quantizer(ctx: Context) -> Result:
    warmup, repeats = (2, 5) if ctx.quick else (3, 9)
    rows, details = [], {}
    for shape in SHAPES:
        ours, theirs = _models(ctx.device)
        x = torch.randn(*shape, device=ctx.device)
        agree = _same_codes(ours, theirs, x)

        def step_ours(ours=ours, x=x) -> None:
            z = x.detach().requires_grad_()
            out = ours(z)
            (out.quantized.square().mean() + out.loss).backward()

        def step_theirs(theirs=theirs, x=x) -> None:
            z = x.detach().requires_grad_()
            quantized, _, loss = theirs(z)
            (quantized.square().mean() + loss).backward()

        timings = time_interleaved({"ours": step_ours, "theirs": step_theirs}, ctx.device, warmup, repeats)
        label = "x".join(map(str, shape))
        figure = f"fwd+bwd time, {label} (B,D,H,W)"
        note = f"same codes on the first batch: {agree:.1%}"
        rows.append(compare("quantizer", figure, scaled(timings["ours"], 1e3), scaled(timings["theirs"], 1e3), "ms",
                            higher_is_better=False, min_ratio=1.0, note=note))
        details[label] = {k: (v.to_dict() if isinstance(v, Timing) else v) for k, v in timings.items()}
        details[label]["same_codes_fraction"] = agree
    settings = {"codebook_size": CODEBOOK_SIZE, "dim": DIM, "decay": DECAY, "commitment": BETA,
                "kmeans_init": False, "dead_code_restart": False, "gradient": "straight-through (both)",
                "shapes": SHAPES, "warmup": warmup, "repeats": repeats,
                "step": "forward in train mode (EMA update) + backward of mean(z_q^2) + loss"}
    return Result(rows, settings, details)
