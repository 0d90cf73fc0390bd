"""Stage 1: train the VQ-VAE-2 on images (the shared Fabric loop), evaluate reconstructions and codebooks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, config_from_dict, save_config
from pipeline.data import ImageData, ImageSet, load_image_data, to_float, to_uint8
from pipeline.distributed import on_rank_zero, shard_batches
from pipeline.images import save_grid
from pipeline.io import UserError, load_checkpoint
from pipeline.training import Task, fit, make_fabric, make_loggers
from pipeline.vqvae import VQVAE2

STAGE1_KEYS = ("data", "vqvae")  # the config sections a stage-1 model depends on


def build_vqvae(cfg: Config) -> VQVAE2:
    return VQVAE2(cfg.vqvae, in_channels=cfg.data.channels)


def config_diff(a: dict[str, Any], b: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """Keys (section.key) whose values differ between two config dicts, in the given sections."""
    out = []
    for sec in sections:
        for key in sorted(set(a.get(sec, {})) | set(b.get(sec, {}))):
            if a.get(sec, {}).get(key) != b.get(sec, {}).get(key):
                out.append(f"{sec}.{key}: {a.get(sec, {}).get(key)!r} -> {b.get(sec, {}).get(key)!r}")
    return out


def check_same_model(ckpt_path: Path, ckpt_cfg: dict, cfg: Config, sections: tuple[str, ...], fix: str) -> None:
    diff = config_diff(ckpt_cfg, cfg.to_dict(), sections)
    if diff:
        raise UserError(f"{ckpt_path} was trained with a different config ({'; '.join(diff[:3])}); {fix}")


def load_vqvae(run_dir: Path, which: str = "best", map_location: str = "cpu") -> tuple[VQVAE2, Config, Path]:
    """The trained stage-1 model of a run, rebuilt from the config stored in its checkpoint."""
    path = Path(run_dir) / "stage1" / f"{which}.ckpt"
    if not path.exists():
        path = Path(run_dir) / "stage1" / "last.ckpt"
    if not path.exists():
        raise UserError(f"no stage-1 checkpoint in {Path(run_dir) / 'stage1'}; run `make stage1` "
                        f"(python -m stages.stage1 --run {run_dir}) first")
    ckpt = load_checkpoint(path, map_location)
    cfg = config_from_dict(ckpt["meta"]["config"])
    model = build_vqvae(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, path


@torch.no_grad()
def reconstruction_metrics(fabric, model, holdout: ImageSet, batch_size: int = 250) -> dict[str, Any]:
    """Held-out MSE (on the [-1, 1] scale), PSNR (peak-to-peak 2), codebook usage over the whole pass and the
    perplexity of the pass's code histogram, per level (top first). Sharded over ranks, then summed."""
    rank, world = fabric.global_rank, fabric.world_size
    levels = model.levels if not hasattr(model, "module") else model.module.levels
    k = (model.module if hasattr(model, "module") else model).cfg.codebook_size
    sq_err = torch.zeros((), device=fabric.device, dtype=torch.float64)
    count = torch.zeros((), device=fabric.device, dtype=torch.float64)
    hist = torch.zeros(levels, k, device=fabric.device, dtype=torch.float64)
    for idx, real in shard_batches(len(holdout), rank, world, batch_size):
        pixels, _ = holdout.__getitems__(idx)
        x = to_float(fabric.to_device(pixels))
        out = model(x)  # every rank runs as many forward passes (FSDP gathers the weights in each)
        if not real:
            continue
        sq_err += (out.reconstruction.float() - x).pow(2).sum().double()
        count += x.numel()
        for level, codes in enumerate(out.codes):
            hist[level] += torch.bincount(codes.flatten(), minlength=k).double()
    if world > 1:
        sq_err, count, hist = (fabric.all_reduce(t, reduce_op="sum") for t in (sq_err, count, hist))
    mse = float(sq_err / count)
    probs = hist / hist.sum(1, keepdim=True)
    perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum(1))
    names = level_names(levels)
    metrics = {"mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}
    for i, name in enumerate(names):
        metrics[f"usage_{name}"] = float((hist[i] > 0).double().mean())
        metrics[f"perplexity_{name}"] = float(perplexity[i])
    return metrics


def level_names(levels: int) -> list[str]:
    """Top first: ["top", "bottom"] for two levels; ["top", "middle1", ..., "bottom"] otherwise."""
    if levels == 1:
        return ["top"]
    return ["top"] + [f"middle{i}" for i in range(1, levels - 1)] + ["bottom"]


def save_reconstructions(fabric, path: Path, model, holdout: ImageSet, n: int) -> None:
    """Originals over reconstructions; every rank runs the model (a collective under FSDP), rank 0 writes."""
    pixels = holdout.all_pixels(n)
    with torch.no_grad():
        recon = model(to_float(fabric.to_device(pixels))).reconstruction
    on_rank_zero(fabric, lambda: save_grid(path, torch.cat([pixels, to_uint8(recon).cpu()]), nrow=min(n, 16)))


def run_stage1(cfg: Config, run_dir: Path, fresh: bool = False) -> dict[str, float]:
    run_dir = Path(run_dir)
    out_dir = run_dir / "stage1"
    last = out_dir / "last.ckpt"
    if last.exists() and not fresh:
        check_same_model(last, load_checkpoint(last)["meta"]["config"], cfg, STAGE1_KEYS,
                         "use --fresh (make stage1 ARGS=--fresh) to retrain, or another RUN folder")
    data: ImageData = load_image_data(cfg.data)
    fabric = make_fabric(cfg.fabric, loggers=make_loggers(out_dir))
    on_rank_zero(fabric, lambda: save_config(cfg, run_dir / "config.yaml"))
    if fabric.global_rank == 0:
        fabric.print(f"stage 1: {len(data.train)} train / {len(data.holdout)} held-out images, "
                     f"{data.image_size}px x {data.channels}ch; run folder {run_dir}")
    torch.manual_seed(cfg.stage1.seed)
    model = build_vqvae(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    fabric.print(f"VQ-VAE-2: {n_params / 1e6:.2f}M parameters, grids {model.grid_shapes(cfg.data.image_size)} "
                 f"(top first), {cfg.vqvae.codebook_size} codes x {cfg.vqvae.code_dim} per level")

    def training_step(fabric, model, batch, step):
        pixels, _ = batch
        x = to_float(pixels)
        if cfg.stage1.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        logs = {"recon_mse": out.recon_loss.detach()}
        for name, u, p in zip(level_names(len(out.usage)), out.usage, out.perplexity):
            logs[f"usage_{name}"], logs[f"perplexity_{name}"] = u, p
        return out.loss, logs

    def validate(fabric, model, step):
        metrics = reconstruction_metrics(fabric, model, data.holdout)
        if cfg.stage1.grid_images:
            save_reconstructions(fabric, out_dir / "reconstructions.png", model, data.holdout, cfg.stage1.grid_images)
        return metrics

    task = Task(model=model, train_set=data.train, training_step=training_step, validate=validate,
                best_metric="mse", units="img", num_workers=cfg.data.num_workers,
                progress_keys=tuple(f"usage_{n}" for n in level_names(cfg.vqvae.levels)),
                meta={"config": cfg.to_dict(), "num_classes": data.num_classes, "stage": "stage1"})
    metrics = fit(fabric, task, cfg.stage1, out_dir, fresh=fresh, desc="stage 1")
    if fabric.global_rank == 0 and metrics:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        fabric.print(f"stage 1 done: held-out {summary}; checkpoints in {out_dir}")
    return metrics
