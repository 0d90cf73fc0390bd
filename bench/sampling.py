"""Benchmark 4: sampling speed of the priors (top then bottom codes, class labels) through
``pipeline.sampling.sample_level``: the GPT with its KV cache against the same model recomputing the whole
sequence at every step, and the PixelCNN with its row-wise incremental state. Freshly initialised models: the
speed does not depend on training."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.common import Context, Result, Row, Timing, compare, scaled, time_interleaved
from bench.training import prior_models


def _sampler(top, bottom, n: int, use_cache: bool, store: dict) -> Callable[[], None]:
    from pipeline.sampling import image_uniforms, sample_level

    labels = torch.arange(n) % top.num_classes
    u_top = image_uniforms(0, 0, range(n), top.seq_len)
    u_bottom = image_uniforms(0, 1, range(n), bottom.seq_len)

    def run() -> None:
        top_codes = sample_level(top, u_top, labels, None, use_cache=use_cache)
        store["codes"] = (top_codes, sample_level(bottom, u_bottom, labels, top_codes, use_cache=use_cache))

    return run


def _agreement(a: dict, b: dict) -> float | None:
    """Fraction of identical codes between two runs (float rounding may flip a rare draw)."""
    if "codes" not in a or "codes" not in b:
        return None
    same = sum(int((x == y).sum()) for x, y in zip(a["codes"], b["codes"]))
    return same / sum(x.numel() for x in a["codes"])


def bench_sampling(ctx: Context) -> Result:
    # the recompute baseline costs ~30-50 s per 250 images on 2 CPU cores: the quick run samples fewer images,
    # and every path is warmed up on a small batch rather than on a full one
    n = 100 if ctx.quick else 250
    warmup_n, repeats = 10, (2 if ctx.quick else 3)
    gpt_top, gpt_bottom = prior_models("gpt", ctx.device)
    pix_top, pix_bottom = prior_models("pixelcnn", ctx.device)
    paths = {"GPT, KV cache": (gpt_top, gpt_bottom, True), "GPT, no cache": (gpt_top, gpt_bottom, False),
             "PixelCNN, row-wise cache": (pix_top, pix_bottom, True)}
    fns, warm, stores = {}, {}, {}
    for key, (top, bottom, cache) in paths.items():
        top.eval()
        bottom.eval()
        stores[key] = {}
        fns[key] = _sampler(top, bottom, n, cache, stores[key])
        warm[key] = _sampler(top, bottom, warmup_n, cache, {})
    time_interleaved(warm, ctx.device, warmup=1, repeats=0)
    timings = time_interleaved(fns, ctx.device, warmup=0, repeats=repeats)
    agree = _agreement(stores["GPT, KV cache"], stores["GPT, no cache"])
    rows: list[Row] = [
        compare("sampling", f"GPT top+bottom, {n} img: KV cache vs none", scaled(timings["GPT, KV cache"], invert=n),
                scaled(timings["GPT, no cache"], invert=n), "img/s", higher_is_better=True, min_ratio=5.0,
                note=f"identical codes with and without the cache: {agree:.2%}" if agree is not None else ""),
        Row("sampling", f"PixelCNN top+bottom, {n} img (row-wise cache)",
            scaled(timings["PixelCNN, row-wise cache"], invert=n), None, "img/s",
            note="its full-network-per-step path (use_cache=False) is not timed: 30+ s per 250 images on 2 cores"),
    ]
    settings = {"images": n, "labels": "i % 10", "levels": "top 4x4 (16 steps) then bottom 8x8 | top (64 steps)",
                "sampling": "temperature 1, no top-k/top-p, no guidance", "repeats": repeats,
                "warmup": f"one call per path on {warmup_n} images",
                "counts": "code sampling of both levels; the VQ-VAE decoder is not included"}
    details = {k: (t.to_dict() if isinstance(t, Timing) else t) for k, t in timings.items()}
    return Result(rows, settings, details)


def _level_sampler(prior, n: int, decoding, store: dict) -> Callable[[], None]:
    """Sampling ``n`` grids of one GPT level (class labels; random top codes for the bottom) with ``decoding``."""
    from pipeline.sampling import image_uniforms, sample_level

    labels = torch.arange(n) % prior.num_classes
    uniforms = image_uniforms(0, 1, range(n), prior.seq_len)
    gen = torch.Generator().manual_seed(0)
    top = torch.randint(prior.cond_num_codes, (n, *prior.cond_grid), generator=gen) if prior.cond_grid else None

    def run() -> None:
        store["codes"] = (sample_level(prior, uniforms, labels, top, decoding=decoding),)

    return run


def bench_kv_cache(ctx: Context) -> Result:
    """The GPT levels of the default config sampled with transformers' dynamic cache, its static cache, and the
    static cache with the one-code step under torch.compile (``sample.kv_cache``, ``sample.compile``), in sequences
    (grids of one level) per second. Every path warms up on the full batch: compiling is per batch shape."""
    from pipeline.priors import Decoding

    n, repeats = (100, 3) if ctx.quick else (250, 5)
    decodings = {"dynamic": Decoding(), "static": Decoding("static"), "static + compile": Decoding("static", True)}
    rows: list[Row] = []
    details: dict = {}
    for level, prior in zip(("top", "bottom"), prior_models("gpt", ctx.device)):
        prior.eval()
        stores = {name: {} for name in decodings}
        fns = {name: _level_sampler(prior, n, d, stores[name]) for name, d in decodings.items()}
        timings = time_interleaved(fns, ctx.device, warmup=1, repeats=repeats)
        figure = f"GPT {level} ({prior.n_positions} positions), {n} sequences"
        for name in ("static", "static + compile"):
            agree = _agreement(stores[name], stores["dynamic"])
            first = timings[name].warmup_times[0] if isinstance(timings[name], Timing) else None
            note = (f"same codes as dynamic: {agree:.2%}" if agree is not None else "") + (
                f"; first call (compiling) {first:.1f} s" if first is not None and "compile" in name else "")
            rows.append(compare("kvcache", f"{figure}: {name} vs dynamic KV cache", scaled(timings[name], invert=n),
                                scaled(timings["dynamic"], invert=n), "seq/s", higher_is_better=True, note=note))
        details[level] = {k: (t.to_dict() if isinstance(t, Timing) else t) for k, t in timings.items()}
    settings = {"sequences": n, "repeats": repeats, "warmup": "one call per path on the full batch",
                "levels": "top 4x4 (16 positions), bottom 8x8 after a class token and 16 top codes (80); float32",
                "sampling": "temperature 1, class labels i % 10, no guidance; the VQ-VAE decoder is not included"}
    return Result(rows, settings, details)
