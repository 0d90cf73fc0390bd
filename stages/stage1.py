"""Stage 1: train the hierarchical VQ-VAE-2 on images with the shared Fabric loop; held-out reconstruction and
codebook metrics at every evaluation, and a grid of originals over reconstructions.

    python -m stages.stage1 --config configs/mnist.yaml [key=value ...]
"""

import sys
from pathlib import Path

import torch
from torch import nn

from pipeline.checkpoint import LAST_CKPT, resume_point, saved_state
from pipeline.config import Config, config_diff, config_from_dict, save_config
from pipeline.critic import AdversarialVQVAE, PatchCritic
from pipeline.data import ImageSet, augment, load_image_data, to_float, to_uint8
from pipeline.distributed import on_rank_zero, rank_zero_first
from pipeline.fabric import log_image, make_fabric, make_loggers
from pipeline.hubstream import hub_streams, load_hub_stream
from pipeline.images import grid_image
from pipeline.io import UserError, atomic_save_png
from pipeline.metrics.reconstruction import reconstruction_stats
from pipeline.sources import has_labels
from pipeline.streaming import StreamedTraining, load_stream_data, stream_listing
from pipeline.training import Task, fit
from pipeline.vqvae import VQVAE2, level_names
from stages.cli import run_main, stage_parser
from stages.data import write_data_report
from stages.runfolder import RunFolder, check_resumable

STAGE1_KEYS = ("data", "vqvae")  # the config sections a stage-1 model depends on


def save_reconstructions(fabric, path: Path, model, holdout: ImageSet, n: int, step: int) -> None:
    """Originals over reconstructions, to ``path`` and TensorBoard; every rank runs the model (a collective under
    FSDP), rank 0 writes."""
    pixels = holdout.all_pixels(n)
    with torch.no_grad():
        recon = model(to_float(fabric.to_device(pixels))).reconstruction

    def write() -> None:
        grid = grid_image(torch.cat([pixels, to_uint8(recon).cpu()]), nrow=min(n, 16), scale=2)
        atomic_save_png(path, grid)
        log_image(fabric, "val/reconstructions", grid, step)

    on_rank_zero(fabric, write)


def adversarial_logs(out, loss: str) -> dict[str, torch.Tensor]:
    """The adversarial term's training logs: its weight (0 before adversarial_start), both losses, the critic's mean
    logit on originals and reconstructions, and the gradient penalty with wgan-gp."""
    logs = {"adv_weight": out.adv_weight, "g_loss": out.g_loss, "d_loss": out.d_loss,
            "logits_real": out.logits_real, "logits_fake": out.logits_fake}
    if loss == "wgan-gp":
        logs["gradient_penalty"] = out.penalty
    return logs


def no_labels(cfg: Config) -> None:
    raise UserError(f"prior.class_conditional=true but the data has no labels (data.source={cfg.data.source}); "
                    "set prior.class_conditional=false, or give the images class folders")


def stage1_model(cfg: Config) -> nn.Module:
    """The VQ-VAE-2, or with ``stage1.adversarial_weight > 0`` the VQ-VAE-2 and its patch critic as one module
    (checkpoint keys ``vqvae.*`` and ``critic.*``; ``stages.runfolder.load_vqvae`` takes the ``vqvae.*`` part)."""
    vqvae = VQVAE2(cfg.vqvae, in_channels=cfg.data.channels)
    s = cfg.stage1
    if s.adversarial_weight == 0:
        return vqvae
    critic = PatchCritic(cfg.data.channels, s.critic_channels)
    return AdversarialVQVAE(vqvae, critic, s.adversarial_loss, s.adversarial_weight)


def critic_changes(trained_for: dict, cfg: Config) -> list[str]:
    """What a resume cannot change because the critic is part of the checkpointed model: switching it on or off,
    and its width. (Its weight, start and loss are training settings: a resume applies and reports them.)"""
    old, new = config_from_dict(trained_for).stage1, cfg.stage1
    if (old.adversarial_weight > 0) != (new.adversarial_weight > 0):
        return [f"stage1.adversarial_weight: {old.adversarial_weight!r} -> {new.adversarial_weight!r} switches the "
                f"critic {'on' if new.adversarial_weight > 0 else 'off'}"]
    if new.adversarial_weight > 0 and old.critic_channels != new.critic_channels:
        return [f"stage1.critic_channels: {old.critic_channels!r} -> {new.critic_channels!r}"]
    return []


def run_stage1(cfg: Config, run: RunFolder, fresh: bool = False) -> dict[str, float]:
    last = run.stage1 / LAST_CKPT
    point = resume_point(last, prefer_sharded=cfg.fabric.strategy == "fsdp")
    if point is not None and not fresh:
        trained_for = config_from_dict(saved_state(point)["meta"]["config"]).to_dict()  # keys added since: defaults
        changes = config_diff(trained_for, cfg.to_dict(), STAGE1_KEYS) + critic_changes(trained_for, cfg)
        check_resumable(last, changes, "config", "stage1")
    listed = stream_listing(cfg.data)  # every process lists the files; workers decode them while training
    hub = hub_streams(cfg.data)  # every process opens the stream: nothing is downloaded or decoded before step 1
    labelled = (listed.class_names is not None) if listed is not None else has_labels(cfg.data)
    if cfg.prior.class_conditional and labelled is False:
        no_labels(cfg)
    fabric = make_fabric(cfg.fabric, loggers=make_loggers(run.stage1))
    if listed is not None:
        data = load_stream_data(cfg.data, listed)
    elif hub:
        data = load_hub_stream(cfg.data)
    else:  # rank 0 prepares and caches the images, then the other ranks read the cache
        data = rank_zero_first(fabric, lambda: load_image_data(cfg.data, cache_dir=run.data_cache))
    if cfg.prior.class_conditional and not data.class_names:
        no_labels(cfg)
    on_rank_zero(fabric, lambda: save_config(cfg, run.config))
    if fabric.global_rank == 0:
        write_data_report(data, cfg, run)  # what `make data` writes, for the data this run trains on
        classes = f", classes {', '.join(data.class_names)}" if data.class_names else ", unlabelled"
        fabric.print(f"stage 1: {data.train_images or 'a stream of'} train / {len(data.holdout)} held-out images "
                     f"({data.holdout_source}), {data.image_size}px x {data.channels}ch{classes}; run folder {run}")
    augmented = cfg.data.hflip or cfg.data.crop_scale < 1
    streamed = listed is not None or hub  # batches come as floats, decoded and augmented in the loader's workers
    train_set = StreamedTraining(data.train, cfg.data.hflip, cfg.data.crop_scale, cfg.stage1.seed) \
        if listed is not None else data.train  # a HubStream is its own position (pipeline.training._batches)
    torch.manual_seed(cfg.stage1.seed)
    model = stage1_model(cfg)
    adversarial = isinstance(model, AdversarialVQVAE)
    vqvae = model.vqvae if adversarial else model
    n_params = sum(p.numel() for p in vqvae.parameters())
    fabric.print(f"VQ-VAE-2: {n_params / 1e6:.2f}M parameters, grids {vqvae.grid_shapes(cfg.data.image_size)} "
                 f"(top first), {cfg.vqvae.codebook_size} codes x {cfg.vqvae.code_dim} per level")
    if adversarial:
        s = cfg.stage1
        n_critic = sum(p.numel() for p in model.critic.parameters())
        fabric.print(f"adversarial term: {s.adversarial_loss} patch critic ({n_critic / 1e6:.2f}M parameters, trained "
                     f"from step 0), weight {s.adversarial_weight:g} x the adaptive weight from step "
                     f"{s.adversarial_start}")
    names = level_names(cfg.vqvae.levels)

    def training_step(fabric, model, batch, step):
        images, _ = batch
        x = images if streamed else to_float(images)  # streamed: floats, decoded and augmented by the loader's workers
        if augmented and not streamed:  # training only: validation, codes and evaluation see the images as they are
            x = augment(x, cfg.data.hflip, cfg.data.crop_scale)
        if cfg.stage1.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x, generator=step >= cfg.stage1.adversarial_start) if adversarial else model(x)
        logs = {"recon_mse": out.recon_loss.detach()}
        for name, u, p in zip(names, out.usage, out.perplexity):
            logs[f"usage_{name}"], logs[f"perplexity_{name}"] = u, p
        if adversarial:
            logs.update(adversarial_logs(out, cfg.stage1.adversarial_loss))
        return out.loss, logs

    def validate(fabric, model, step):
        metrics = reconstruction_stats(fabric, model, data.holdout).metrics
        if cfg.stage1.grid_images:
            save_reconstructions(fabric, run.stage1_grid, model, data.holdout, cfg.stage1.grid_images, step)
        return metrics

    task = Task(model=model, train_set=train_set, training_step=training_step, validate=validate,
                best_metric="mse", units="img", num_workers=cfg.data.num_workers, sharded=listed is not None,
                progress_keys=tuple(f"usage_{n}" for n in names) + (("adv_weight",) if adversarial else ()),
                meta={"config": cfg.to_dict(), "num_classes": data.num_classes, "class_names": data.class_names,
                      "stage": "stage1"})
    metrics = fit(fabric, task, cfg.stage1, run.stage1, fresh=fresh, desc="stage 1")
    if fabric.global_rank == 0 and metrics:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        fabric.print(f"stage 1 done: held-out {summary}; checkpoints in {run.stage1}")
    return metrics


def main(argv=None) -> int:
    parser = stage_parser(
        "stage1",
        "Stage 1: train the VQ-VAE-2 (checkpoints, logs and a reconstruction grid in RUN/stage1/).",
        ("data", "fabric", "vqvae", "stage1"), fresh=True,
        example="stage1.max_steps=200 vqvae.codebook_size=256",
    )
    return run_main(lambda cfg, run, args: run_stage1(cfg, run, fresh=args.fresh), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
