"""Stage 3: sample images from the trained priors and decoder, and export the self-contained sampler."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.distributed import gather_rows, on_rank_zero, shard_indices
from pipeline.images import grid_image
from pipeline.io import atomic_save_png, atomic_savez
from pipeline.sampler import Sampler, Samples
from pipeline.stage1 import level_names, load_vqvae
from pipeline.stage2 import check_priors_match, load_prior
from pipeline.training import make_fabric


def build_sampler(run_dir: Path) -> Sampler:
    """The sampler of a run, from its stage-1 and stage-2 checkpoints (architectures read from them)."""
    vqvae, cfg1, stage1_path = load_vqvae(run_dir)
    names = level_names(vqvae.levels)
    priors, specs, metas = [], [], []
    for name in names:
        prior, meta = load_prior(run_dir, name)
        priors.append(prior)
        specs.append(meta["prior"])
        metas.append(meta)
    check_priors_match(stage1_path, metas, run_dir)
    return Sampler.from_models(vqvae, priors, cfg1.data.image_size, names, specs)


def sampling_settings(cfg: Config) -> dict:
    s = cfg.sample
    return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "labels": s.labels,
            "guidance": s.guidance, "seed": s.seed}


def run_sample(cfg: Config, run_dir: Path) -> Samples | None:
    run_dir = Path(run_dir)
    sampler = build_sampler(run_dir)
    fabric = make_fabric(cfg.fabric)
    sampler = sampler.to(fabric.device)
    settings = sampling_settings(cfg)
    s = cfg.sample
    sampler.resolve_labels(s.labels, [0], s.seed)  # bad labels fail here, before anything is written
    on_rank_zero(fabric, lambda: sampler.save_pretrained(run_dir / "sampler", settings))
    indices = shard_indices(s.num, fabric.global_rank, fabric.world_size)
    start = time.perf_counter()
    part = sampler.generate_samples(len(indices), s.temperature, s.top_k, s.top_p, s.labels, s.guidance, s.seed,
                                    s.batch_size, indices=indices, progress=fabric.global_rank == 0)
    gathered = gather_rows(fabric, [part.images, part.labels, *part.codes], s.num)
    samples = None if gathered is None else Samples(images=gathered[0], labels=gathered[1], codes=gathered[2:])
    elapsed = time.perf_counter() - start

    def write() -> None:  # rank 0 only
        out = run_dir / "samples"
        grid = None  # built before anything is written, so a failure leaves the previous files as they were
        if s.grid_images:
            shown = samples.images[: s.grid_images]
            order = np.argsort(samples.labels[: s.grid_images], kind="stable") if sampler.num_classes else None
            grid = grid_image(shown if order is None else shown[order], scale=2)
        arrays = {f"codes_{n}": c for n, c in zip(sampler.level_names, samples.codes)}
        atomic_savez(out / "samples.npz", images=samples.images, labels=samples.labels,
                     settings=np.asarray(json.dumps(settings)), **arrays)
        if grid is not None:
            atomic_save_png(out / "grid.png", grid)
        written = f"{out}/samples.npz" + (f", {out}/grid.png" if grid is not None else "")
        fabric.print(f"sample: {s.num} images in {elapsed:.1f} s ({s.num / elapsed:.0f} img/s) -> {written}; "
                     f"sampler exported to {run_dir / 'sampler'}")

    on_rank_zero(fabric, write)  # a failure there stops every rank with its message
    return samples
