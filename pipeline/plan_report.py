"""The printed GPU plan (``python -m pipeline.plan --config C [key=value ...]``): the config loaded with its
overrides as every stage loads it, then the tables of :mod:`pipeline.plan` as Markdown, with every assumption
listed above them."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, load_config
from pipeline.plan import (
    GIB,
    GPU_GIB,
    MFU,
    PEAK_TFLOPS,
    RESERVE_GIB,
    Assumptions,
    PriorPlan,
    Stage1Plan,
    built_prior_params,
    built_vqvae_params,
    decode_seconds_per_image,
    images_per_second,
    is_guided,
    kv_batch_limit,
    plan_prior,
    plan_stage1,
    prior_shapes,
    sample_dtype_bytes,
    sampling_batch,
    sampling_weight_bytes,
    train_memory,
)

DATASETS = {"imagenet": (1_281_167, 1000), "ffhq": (70_000, 0), "cifar10": (50_000, 10), "fashion": (60_000, 10),
            "mnist_5k": (4_000, 10)}  # (training images, classes) by a word of data.name (hub, embedded) or data.path


def dataset_defaults(cfg: Config) -> tuple[int, int]:
    """(training images, classes) of a known dataset, else (0, 0): pass --epoch-images and --classes."""
    where = (cfg.data.name if cfg.data.source in ("hub", "embedded") else cfg.data.path).lower()
    return next((v for word, v in DATASETS.items() if word in where), (0, 0))


def _gib(x: float) -> str:
    if x >= 10 * GIB:
        return f"{x / GIB:.1f}"
    return f"{x / GIB:.2f}" if x >= 0.01 * GIB else "< 0.01"


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def _levels_table(cfg: Config, s1: Stage1Plan, priors: list[PriorPlan]) -> list[str]:
    rows = [["VQ-VAE (stage 1)", f"{cfg.data.image_size} px", "", "", "", "", f"{s1.params:,}",
             f"{built_vqvae_params(cfg):,}"]]
    for p in priors:
        s, net = p.shape, p.net
        desc = f"{net.kind} {net.arch} {net.n_layer}x{net.n_embd}" if net.kind == "gpt" else \
            f"pixelcnn {net.layers}x{net.channels}"
        gpt = net.kind == "gpt"  # a PixelCNN reads the upper grid through its conditioning network: no prefix
        window = f"{s.window} x {s.window}" if s.window else ("whole grid" if s.cond_side and gpt else "")
        rows.append([f"{s.name} prior ({desc})", f"{s.side}x{s.side}", f"{s.tokens:,}", window,
                     f"{s.prefix:,}" if gpt else "", f"{s.positions if gpt else s.tokens:,}", f"{p.params:,}",
                     f"{built_prior_params(net, s):,}"])
    return _table(["model", "grid", "tokens/image", "upper codes seen (prior.cond_window)",
                   "prefix (class + upper grid)", "positions (= KV length)", "params (formula)",
                   "params (built, meta)"], rows)


@dataclass
class _Run:
    """One training run of the plan: stage 1, or one prior of stage 2 (figures per image)."""

    name: str
    params: int
    flops: float
    act: float
    act_ckpt: float | None  # None: no per-block checkpointing to speak of (the VQ-VAE)
    train: Any  # the stage1 / stage2 config section
    tokens: int = 0  # codes per image (priors)


def _runs(cfg: Config, s1: Stage1Plan, priors: list[PriorPlan]) -> list[_Run]:
    return [_Run("stage 1 VQ-VAE", s1.params, s1.flops, s1.act, None, cfg.stage1)] + \
        [_Run(f"stage 2 {p.shape.name}", p.params, p.flops, p.act, p.act_ckpt, cfg.stage2, p.shape.tokens)
         for p in priors]


def _memory_table(cfg: Config, s1: Stage1Plan, priors: list[PriorPlan], a: Assumptions) -> list[str]:
    usable, rows = (a.gpu_gib - RESERVE_GIB) * GIB, []

    def fits(x: float | str) -> str:
        return "" if x == "" else _gib(x) + ("" if x <= usable else " (over)")

    for r in _runs(cfg, s1, priors):
        batch = r.train.batch_size
        for strategy in ("ddp", "fsdp"):
            mem = train_memory(r.params, r.act, batch, a.gpus, strategy)
            total = sum(mem.values())
            ckpt = "" if r.act_ckpt is None else total - mem["activations"] + r.act_ckpt * batch
            rows.append([r.name, strategy, batch] + [_gib(mem[k]) for k in ("weights", "grads", "adamw", "extra",
                                                                              "activations")]
                        + [fits(total), "" if r.act_ckpt is None else _gib(r.act_ckpt * batch), fits(ckpt)])
    return _table(["stage", "strategy", "batch/GPU", "weights", "grads", "AdamW", "DDP buckets / FSDP gathered",
                   "activations", "total", "activations (ckpt)", "total (ckpt)"], rows)


def _throughput_table(cfg: Config, s1: Stage1Plan, priors: list[PriorPlan], a: Assumptions) -> list[str]:
    rows = []
    for r in _runs(cfg, s1, priors):
        rate = images_per_second(r.flops, a)
        global_batch = r.train.batch_size * a.gpus * r.train.grad_accum
        epoch = _duration(a.epoch_images / rate) if a.epoch_images else "n/a"
        rows.append([r.name, _count(r.params), f"{r.flops:.3g}", f"{rate:,.0f}",
                     f"{rate * r.tokens:,.0f}" if r.tokens else "", epoch, global_batch, f"{r.train.max_steps:,}",
                     _duration(r.train.max_steps * global_batch / rate)])
    return _table(["stage", "params", "train FLOPs/image", f"images/s on {a.gpus} GPUs", "codes/s", "epoch",
                   "global batch", "max_steps", "max_steps time"], rows)


def _sampling_table(cfg: Config, s1: Stage1Plan, priors: list[PriorPlan], a: Assumptions) -> list[str]:
    guided = is_guided(cfg, priors[0].shape.num_classes)
    batch, factor, limit = sampling_batch(cfg, priors, guided), 2 if guided else 1, kv_batch_limit(cfg, priors, guided)
    weights = sampling_weight_bytes(cfg, sum(p.params for p in priors), s1.params)
    usable, rows = (a.gpu_gib - RESERVE_GIB) * GIB, []
    for p in priors:
        most = int((usable - weights) // (p.kv * factor))
        total = weights + p.kv * factor * batch
        length = f"{p.shape.positions:,}" if p.net.kind == "gpt" else "rows"
        rows.append([p.shape.name, f"{batch} x {factor}", length, f"{p.kv / 2**20:.1f}",
                     _gib(p.kv * factor * batch), _gib(total) + ("" if total <= usable else " (over)"), f"{most:,}"])
    rate = a.gpus / decode_seconds_per_image(priors, batch, guided, a, sample_dtype_bytes(cfg))
    source = "sample.batch_size" if limit is None else \
        f"sample.batch_size={cfg.sample.batch_size} within sample.max_kv_gib={cfg.sample.max_kv_gib:g}"
    too_small = [] if limit != 0 else [f"sample.max_kv_gib={cfg.sample.max_kv_gib:g} holds no image's key/value "
                                       "cache: sampling would stop with an error (raise it, or 0 for no limit)."]
    return _table(["level", "sequences/GPU (batch x guidance)", "KV length", "KV MiB/sequence", "KV cache GiB/GPU",
                   "with all weights GiB/GPU", "largest batch that fits"], rows) + \
        ["", f"Sampling batch {batch} per GPU ({source}) in {cfg.sample.dtype} (sample.dtype: the KV cache and the "
             f"priors' copies; the sampler keeps its fp32 weights too); guidance {cfg.sample.guidance:g}: "
             f"{'x2 sequences' if guided else 'off'}. Bandwidth-bound estimate: {rate:,.1f} images/s on {a.gpus} "
             f"GPUs, {_duration(cfg.sample.num / rate)} for sample.num={cfg.sample.num:,}.", *too_small]


def plan_text(cfg: Config, a: Assumptions, source: str = "") -> str:
    """The whole printed plan: assumptions, then the four tables."""
    num_classes = a.classes if cfg.prior.class_conditional else 0
    s1 = plan_stage1(cfg)
    priors = [plan_prior(cfg.prior.net_for(s.name), s, sample_dtype_bytes(cfg))
              for s in prior_shapes(cfg, num_classes)]
    head = [f"# GPU plan for {source or 'the config'}: {cfg.data.image_size} px, {cfg.vqvae.levels} levels, "
            f"strides {cfg.vqvae.level_strides()} (bottom first), cond_window {cfg.prior.cond_window}, "
            f"{num_classes} classes" + (" (class-conditional, but how many classes? --classes N)"
                                          if cfg.prior.class_conditional and not num_classes else ""), ""] \
        + [f"- {line}" for line in a.lines()]
    pixels = a.epoch_images * cfg.data.channels * cfg.data.image_size**2
    disk = f"{pixels / 1e9:,.1f} GB on disk for {a.epoch_images:,} images" if a.epoch_images else \
        "unknown dataset size (--epoch-images N)"
    head.append(f"- prepared data (uint8 pixels, RUN/data): {disk}; stage 1's FLOP rate is an upper bound (small "
                "convolutions and data loading limit it first)")
    return "\n".join(head + ["", "## Levels and sequences", ""] + _levels_table(cfg, s1, priors)
                     + ["", "## Training memory per GPU (GiB)", ""] + _memory_table(cfg, s1, priors, a)
                     + ["", "## Training throughput", ""] + _throughput_table(cfg, s1, priors, a)
                     + ["", "## Sampling memory and speed per GPU", ""] + _sampling_table(cfg, s1, priors, a)) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pipeline.io import report_errors

    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description="Print the GPU plan of a config: "
                                     "grids, sequences, parameters, memory per GPU, throughput (see pipeline/plan.py).")
    parser.add_argument("--config", required=True, help="the YAML preset, e.g. configs/imagenet256.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, as for the stages (e.g. prior.cond_window=9)")
    parser.add_argument("--gpu", choices=sorted(PEAK_TFLOPS), default="h100", help="peak FLOP/s and bandwidth")
    parser.add_argument("--mfu", type=float, default=MFU, help="model FLOPs utilisation of training")
    parser.add_argument("--gpu-gib", type=float, default=GPU_GIB, help="memory per GPU")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs in all (0 = fabric.devices x fabric.num_nodes)")
    parser.add_argument("--epoch-images", type=int, default=-1, help="training images (default: known datasets)")
    parser.add_argument("--classes", type=int, default=-1, help="classes (default: known datasets)")
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    args = parser.parse_args(argv)

    def run() -> None:
        cfg = load_config(args.config, args.overrides)
        images, classes = dataset_defaults(cfg)
        a = Assumptions(args.gpu, args.mfu, args.gpu_gib, args.gpus or cfg.fabric.devices * cfg.fabric.num_nodes,
                        images if args.epoch_images < 0 else args.epoch_images,
                        classes if args.classes < 0 else args.classes)
        print(plan_text(cfg, a, args.config), end="")

    return report_errors(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
