"""The run folder: every path of its layout, the loaders of what one stage hands the next (stage-1 and prior
checkpoints, sha-checked against each other; samples), and the hint that names the stage to run first.
No other module builds a run-folder path.

    RUN/
      config.yaml                  the resolved config of the latest stage-1 run
      data/                        summary.json, preview.png, cache/ (the prepared images; none when streamed)
      .lock                        held while a stage runs here
      stage1/                      last.ckpt, best.ckpt, logs/, reconstructions.png
      codes/                       manifest.json + code shards (pipeline.codes)
      stage2/<level>/              last.ckpt, best.ckpt; stage2/logs/, stage2/summary.json
      samples/                     samples.npz (1 process) or shard-RRRRR-of-WWWWW.npz (one per process),
                                   manifest.json, grid.png (pipeline.samples)
      sampler/                     config.json, model.safetensors, README.md
      eval/                        report.json, report.md, reconstructions.png, codebook_usage.png,
                                   classifier.ckpt, sweep.json, sweep.png, reference/ (cached real features)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import BEST_CKPT, LAST_CKPT
from pipeline.codes import CodeSet, file_sha256, load_manifest
from pipeline.config import Config, DataConfig, config_from_dict
from pipeline.critic import vqvae_state_dict
from pipeline.data import ImageData, load_image_data
from pipeline.distributed import rank_zero_first
from pipeline.hubstream import hub_streams, load_hub_stream
from pipeline.io import UserError, load_checkpoint
from pipeline.priors import Prior, normalize_spec, prior_from_spec
from pipeline.sampler import Sampler
from pipeline.samples import SampleSet, load_sample_set
from pipeline.streaming import load_stream_data, stream_listing
from pipeline.vqvae import VQVAE2, level_names


@dataclass(frozen=True)
class RunFolder:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    data = property(lambda self: self.root / "data")
    data_summary = property(lambda self: self.data / "summary.json")
    data_preview = property(lambda self: self.data / "preview.png")
    data_cache = property(lambda self: self.data / "cache")
    stage1 = property(lambda self: self.root / "stage1")
    stage1_grid = property(lambda self: self.stage1 / "reconstructions.png")
    codes = property(lambda self: self.root / "codes")
    stage2 = property(lambda self: self.root / "stage2")
    stage2_summary = property(lambda self: self.stage2 / "summary.json")
    samples = property(lambda self: self.root / "samples")
    samples_npz = property(lambda self: self.samples / "samples.npz")
    sample_grid = property(lambda self: self.samples / "grid.png")
    sampler = property(lambda self: self.root / "sampler")
    eval = property(lambda self: self.root / "eval")
    classifier = property(lambda self: self.eval / "classifier.ckpt")
    reference_cache = property(lambda self: self.eval / "reference")
    report_json = property(lambda self: self.eval / "report.json")
    report_md = property(lambda self: self.eval / "report.md")
    eval_reconstructions = property(lambda self: self.eval / "reconstructions.png")
    codebook_usage = property(lambda self: self.eval / "codebook_usage.png")
    sweep_json = property(lambda self: self.eval / "sweep.json")
    sweep_png = property(lambda self: self.eval / "sweep.png")

    def prior(self, level: str) -> Path:
        return self.stage2 / level

    def __str__(self) -> str:
        return str(self.root)


def load_run_data(cfg: DataConfig, run: RunFolder, fabric, random_access: bool = True) -> ImageData:
    """The images of a run, as every stage reads them: streamed from the folder's files when stage 1 streams it
    (``stream_listing``: every process lists the files, nothing is decoded up front or cached); a streamed Hub
    dataset's held-out images from its own held-out split, and its training split streamed (stage 1, and without
    ``random_access``) or map-style from the ``datasets`` cache (opened by rank 0 first, which may download it);
    else decoded once into RUN/data/cache by rank 0 and read from there by the other ranks. Streamed sets decode in
    data.num_workers DataLoader workers where a stage reads many images (``pipeline.data.read_batches``)."""
    listed = stream_listing(cfg)
    if listed is not None:
        return load_stream_data(cfg, listed)
    if hub_streams(cfg):
        if not random_access:
            return load_hub_stream(cfg)
        return rank_zero_first(fabric, lambda: load_hub_stream(cfg, random_access=True))
    return rank_zero_first(fabric, lambda: load_image_data(cfg, cache_dir=run.data_cache))


def run_first(run: RunFolder, stage: str, *args: str) -> str:
    """The hint that ends an error about a missing hand-over: which stage writes it, as make and as python."""
    extra = " ".join(args)
    make = f"make {stage}" + (f' ARGS="{extra}"' if extra else "")
    return f"run `{make}` (python -m stages.{stage} --run {run.root}{' ' + extra if extra else ''}) first"


def trained_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a later stage uses: the best by held-out metric, else the last, else None."""
    for name in (BEST_CKPT, LAST_CKPT):
        if (folder / name).is_file():
            return folder / name
    return None


def check_resumable(last: Path, differences: list[str], what: str, stage: str) -> None:
    """Refuse to resume ``last`` when what it was trained for differs from what is asked now."""
    if differences:
        raise UserError(f"{last} was trained with a different {what} ({'; '.join(differences[:3])}); use --fresh "
                        f"(make {stage} ARGS=--fresh) to retrain, or another RUN folder")


# ----------------------------------------------------------------------------------------------------------
# what the stages hand each other


def load_vqvae(run: RunFolder, map_location: str = "cpu") -> tuple[VQVAE2, Config, Path]:
    """The trained stage-1 model, rebuilt from the config stored in its checkpoint; its config and path. A run with
    the adversarial term (``stage1.adversarial_weight > 0``) checkpointed the VQ-VAE-2 and its critic together:
    only the VQ-VAE-2 is loaded, so no later stage or export holds the critic."""
    path = trained_checkpoint(run.stage1)
    if path is None:
        raise UserError(f"no stage-1 checkpoint in {run.stage1}; {run_first(run, 'stage1')}")
    ckpt = load_checkpoint(path, map_location)
    cfg = config_from_dict(ckpt["meta"]["config"])
    model = VQVAE2(cfg.vqvae, in_channels=cfg.data.channels)
    model.load_state_dict(vqvae_state_dict(ckpt["model"]))
    return model.eval(), cfg, path


def load_priors(run: RunFolder, levels: int, stage1_path: Path, map_location: str = "cpu") -> list[tuple[Prior, dict]]:
    """Each level's trained prior (top first) and its checkpoint's meta. Priors fitted to the codes of another
    stage-1 checkpoint are refused: their samples would be codes this decoder does not share."""
    sha = file_sha256(stage1_path)
    out = []
    for name in level_names(levels):
        path = trained_checkpoint(run.prior(name))
        if path is None:
            raise UserError(f"no stage-2 checkpoint for the {name} prior in {run.prior(name)}; "
                            f"{run_first(run, 'stage2')}")
        ckpt = load_checkpoint(path, map_location)
        meta = ckpt["meta"]
        if meta.get("stage1_sha256") != sha:
            raise UserError(f"the {name} prior in {run.stage2} was trained on the codes of another stage-1 model "
                            f"than {stage1_path}; retrain the priors: make stage2 ARGS=--fresh (python -m "
                            f"stages.stage2 --run {run.root} --fresh)")
        prior = prior_from_spec(meta["prior"])
        prior.load_state_dict(ckpt["model"])
        out.append((prior.eval(), meta))
    return out


def build_sampler(run: RunFolder) -> tuple[Sampler, Config]:
    """The sampler of a run, from its stage-1 and stage-2 checkpoints (architectures read from them), and the
    stage-1 config (its data settings), so no caller loads stage 1 a second time."""
    vqvae, cfg1, stage1_path = load_vqvae(run)
    priors = load_priors(run, vqvae.levels, stage1_path)
    num_classes = priors[0][0].num_classes  # older checkpoints have no class names: the indices name them
    class_names = (priors[0][1].get("class_names") or [str(i) for i in range(num_classes)]) if num_classes else None
    sampler = Sampler.from_models(vqvae, [p for p, _ in priors], cfg1.data.image_size, level_names(vqvae.levels),
                                  [normalize_spec(meta["prior"]) for _, meta in priors], class_names,
                                  cfg1.data.background)
    return sampler, cfg1


def load_samples(run: RunFolder) -> SampleSet:
    """The run's samples (every reader goes through this: one shard per sampling process, or samples.npz)."""
    samples = load_sample_set(run.samples)
    if samples is None:
        raise UserError(f"no samples at {run.samples_npz}; {run_first(run, 'sample')}")
    return samples


def load_codes(run: RunFolder, split: str) -> CodeSet:
    """The extracted code grids of ``split`` (train or holdout)."""
    try:
        manifest = load_manifest(run.codes)
    except UserError as err:
        raise UserError(f"{err}; {run_first(run, 'stage2')}") from None
    return CodeSet(run.codes, split, manifest)
