"""Stage 4: score the samples and the models, and write one report.

Sample quality (FID, KID, Inception Score, precision/recall, density/coverage) is measured in the feature space
of the headline extractor (the standard FID Inception network by default) and, beside it, of the domain
classifier, each against a reference set of N real *train* images; the real-data floor is the same metrics
for N real *held-out* images against that same reference, so both numbers share N and reference (when N exceeds
the held-out set, the floor is topped up with train images outside the reference). Every rank scores its own
share of each set; the sums behind FID and IS are all-reduced and only features travel (pipeline.metrics.reduced).
Reconstructions (MSE, PSNR, rFID: held-out originals vs their reconstructions), codebooks (usage and
perplexity per level over the held-out pass) and priors (held-out NLL in bits per code per level) complete it.

    python -m stages.evaluate --config configs/mnist.yaml [key=value ...]
"""

import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from pipeline.codes import CodeSet, file_sha256
from pipeline.config import Config, DataConfig
from pipeline.data import ImageData, real_provenance, to_float, to_uint8
from pipeline.distributed import on_rank_zero, rank_zero_first
from pipeline.export import CARD, CONFIG, record_evaluation
from pipeline.fabric import make_fabric
from pipeline.images import save_grid
from pipeline.io import UserError, atomic_write_text
from pipeline.metrics import judge
from pipeline.metrics.extract import PROTOCOL, make_extractor
from pipeline.metrics.moments import fid_from_moments
from pipeline.metrics.reconstruction import reconstruction_stats
from pipeline.metrics.reduced import Reduced, cached_reduction, reduce_features, reference_dir
from pipeline.metrics.report import per_class_accuracy, quality, report_markdown, summary_table, usage_plot
from pipeline.priors.likelihood import heldout_nll_bits
from pipeline.samples import SampleSet
from pipeline.vqvae import level_names
from stages.cli import run_main, stage_parser
from stages.runfolder import RunFolder, load_codes, load_priors, load_run_data, load_samples, load_vqvae


def prior_nll(fabric, priors, codes_holdout: CodeSet, names: list[str]) -> dict[str, float]:
    """Held-out NLL (bits/code) per level, and for lower levels with the level above shuffled across images."""
    nll = {}
    for level, (name, (prior, _)) in enumerate(zip(names, priors)):
        prior = prior.to(fabric.device)
        nll[name] = heldout_nll_bits(fabric, prior, codes_holdout, level, prior.num_classes)
        if level > 0:
            nll[f"{name}_shuffled_{names[level - 1]}"] = heldout_nll_bits(
                fabric, prior, codes_holdout, level, prior.num_classes, shuffle_cond=True)
    return nll


class RealImages:
    """The real images of an evaluation at N: the reference is N train images drawn by seed 0 (``seeded_subset``'s);
    the real floor is the first N held-out images, topped up, when N exceeds the held-out set, with the next train
    images of the same permutation (never reference images). Pixels are read per batch of indices, so a rank
    reads only its share."""

    def __init__(self, data: ImageData, cfg: DataConfig, n: int) -> None:
        self.data, self.cfg, self.n = data, cfg, n
        self.workers = data.train.workers  # decoding processes of streamed files (reference and floor read files)
        self.held = min(n, len(data.holdout))
        perm = np.random.default_rng(0).permutation(len(data.train))
        self.ref_idx, self.extra_idx = np.sort(perm[:n]), perm[n : n + n - self.held]

    def reference(self, chunk: list[int]) -> torch.Tensor:
        return self.data.train.__getitems__(self.ref_idx[chunk].tolist())[0]

    def floor(self, chunk: list[int]) -> torch.Tensor:
        held = [i for i in chunk if i < self.held]
        extra = self.extra_idx[[i - self.held for i in chunk if i >= self.held]].tolist()
        parts = [self.data.holdout.__getitems__(held)[0]] if held else []
        return torch.cat(parts + ([self.data.train.__getitems__(extra)[0]] if extra else []))

    def floor_labels(self) -> np.ndarray:
        return np.concatenate([self.data.holdout.labels[: self.held].numpy(),
                               self.data.train.labels[torch.as_tensor(self.extra_idx, dtype=torch.long)].numpy()])

    def provenance(self, split: str) -> dict:
        return real_provenance(self.data, self.cfg, split)


def max_real(train: int, holdout: int) -> int:
    """The largest evaluate.num_real the data allows: N reference images and N - held-out floor images from train."""
    return min(train, (train + holdout) // 2)


def sample_pixels(samples: SampleSet):
    """``pixels_of`` for the samples: each batch's rows read from the memory-mapped shards."""
    return lambda chunk: torch.from_numpy(samples.take(chunk, ["images"])["images"]).permute(0, 3, 1, 2).contiguous()


def recon_pixels(fabric, vqvae, real: RealImages):
    """``pixels_of`` for the reconstructions of the held-out images."""
    @torch.no_grad()
    def pixels_of(chunk: list[int]) -> torch.Tensor:
        held = real.data.holdout.__getitems__(chunk)[0]
        return to_uint8(vqvae(to_float(held.to(fabric.device))).reconstruction).cpu()
    return pixels_of


def extracted(fabric, extractor, e, real: RealImages, samples_of, recon_of, run: RunFolder, stage1_sha: str,
              log) -> dict:
    """The statistics of the train reference, the samples, the real floor, the held-out images and their
    reconstructions in one extractor's space (real sets cached in the shared reference folder, reconstructions
    in the run's), and the seconds it took. Ranks other than 0 get statistics without features."""
    t0, n, h, bs = time.perf_counter(), real.n, real.held, e.batch_size
    keep = e.gather_features or n
    about = {"extractor": extractor.name, "weights_sha256": extractor.fingerprint, "protocol": PROTOCOL[extractor.name]}

    def real_set(what: str, pixels_of, total: int, provenance: dict, folder, workers: int = real.workers) -> Reduced:
        meta = {**provenance, **about, "n": total, "kept": min(keep, total)}
        return cached_reduction(fabric, folder, meta, lambda: reduce_features(
            fabric, extractor, pixels_of, total, bs, keep, f"{extractor.name}: {what}", workers), log)

    shared = reference_dir(e.reference_dir)
    out = {"ref": real_set("train reference", real.reference, n, real.provenance("train"), shared),
           "fake": reduce_features(fabric, extractor, samples_of, n, bs, keep, f"{extractor.name}: samples")}
    floor = real.provenance("holdout") if h == n else {**real.provenance("holdout+train"), "holdout_images": h}
    out["floor"] = real_set("real floor", real.floor, n, floor, shared)
    out["held"] = out["floor"] if h == n else real_set("held-out", real.floor, h, real.provenance("holdout"), shared)
    out["rec"] = real_set("reconstructions", recon_of, h, {**real.provenance("holdout"), "split": "recon",
                                                          "stage1": stage1_sha}, run.reference_cache, workers=0)
    return {**out, "seconds": time.perf_counter() - t0}


def scores(x: dict, e) -> dict:
    """One extractor's metrics: samples and real floor against the same reference, and the reconstructions' FID."""
    return {**quality(x["ref"], x["fake"], e.k, e.bootstrap),
            "real_floor": quality(x["ref"], x["floor"], e.k, e.bootstrap),
            "rfid": fid_from_moments(x["held"].moments, x["rec"].moments)}


def independent_judgement(asked: np.ndarray, samples_of, real: RealImages, log) -> dict | None:
    """The asked-class shares by the independent judge (an SVM on pixels fitted here on train images), beside its
    own floor on the real held-out images (never train images, which it may have been fitted on); None for
    unconditional samples, unlabelled data or more than judge.MAX_CLASSES classes."""
    data, names, held = real.data, real.data.class_names, real.held
    if not names or len(names) > judge.MAX_CLASSES or not (asked >= 0).any():
        return None
    t0 = time.perf_counter()
    svm, fitted = judge.fit_judge(data.train)
    if svm is None:
        return None
    out = per_class_accuracy(judge.judged(svm, samples_of, len(asked)), asked, judge.judged(svm, real.floor, held),
                             real.floor_labels()[:held], names)
    log(f"evaluate: independent judge fitted on {fitted} train images, {time.perf_counter() - t0:.1f} s")
    return {**out, "judge": judge.DESCRIPTION, "fitted_on": fitted}


def evaluation_size(samples: int, train: int, holdout: int, e) -> int:
    """N: every sample up to evaluate.num_real, or with num_real=0 up to the held-out set's size."""
    n = min(samples, e.num_real) if e.num_real else min(samples, holdout, train)
    if e.num_real and n > max_real(train, holdout):
        raise UserError(f"evaluate.num_real={e.num_real}: N = {n} needs {n} train images for the reference and "
                        f"{n - holdout} more beside the {holdout} held-out for the real floor, but the train split "
                        f"has {train}; set evaluate.num_real to at most {max_real(train, holdout)}")
    if n < e.k + 1:
        raise UserError(f"only {n} images to compare (samples {samples}, held-out {holdout}); need more than "
                        f"evaluate.k={e.k}")
    return n


def run_evaluate(cfg: Config, run: RunFolder) -> dict | None:
    t0 = time.perf_counter()
    e = cfg.evaluate
    samples = load_samples(run)
    vqvae, cfg1, stage1_path = load_vqvae(run)
    names = level_names(vqvae.levels)
    priors = load_priors(run, vqvae.levels, stage1_path)
    fabric = make_fabric(cfg.fabric)
    log = fabric.print
    on_rank_zero(fabric, samples.check)  # a missing or damaged shard stops every rank with one line, up front
    data = load_run_data(cfg1.data, run, fabric)
    kinds = [e.extractor] + (["domain"] if e.extractor == "inception" and e.domain_column else [])
    # rank 0 trains (or loads) and caches the domain classifier, or installs the Inception weights; then the others
    extractors = [rank_zero_first(fabric, lambda k=k: make_extractor(k, e, run.classifier, data, log=log,
                                                                     device=fabric.device))
                  for k in kinds]

    n = evaluation_size(len(samples), len(data.train), len(data.holdout), e)
    real = RealImages(data, cfg1.data, n)

    # reconstructions (rFID: held-out originals vs their reconstructions), codebooks, priors
    vqvae = vqvae.to(fabric.device)
    recon_stats = reconstruction_stats(fabric, vqvae, data.holdout)
    samples_of, recon_of, sha = sample_pixels(samples), recon_pixels(fabric, vqvae, real), file_sha256(stage1_path)
    feats = {ex.name: extracted(fabric, ex, e, real, samples_of, recon_of, run, sha, log) for ex, _ in extractors}
    nll = prior_nll(fabric, priors, load_codes(run, "holdout"), names)

    def write_report() -> dict:  # rank 0 only: the metrics, pictures and report files
        stats = recon_stats.metrics
        settings = samples.settings
        (head, head_info), *rest = extractors
        first = scores(feats[head.name], e)
        labelled = feats.get("domain")  # the per-class rows need the domain classifier's logits
        asked = samples.labels()[:n]
        report: dict[str, Any] = {
            **{k: v for k, v in first.items() if k != "rfid"},
            "num_samples": int(n),
            "real_floor_images": {"holdout": real.held, "train": n - real.held},
            "feature_extractor": head.name,
            **head_info,
            "k": e.k,
            "bootstrap_rounds": e.bootstrap,
            "protocol": {ex.name: PROTOCOL[ex.name] for ex, _ in extractors},
            "feature_seconds": {name: round(x["seconds"], 1) for name, x in feats.items()},
            "feature_speed": {ex.name: ex.speed() for ex, _ in extractors},  # the networks alone, this process
            **{ex.name: {**scores(feats[ex.name], e), **info} for ex, info in rest},
            "recon": {"mse": stats["mse"], "psnr": stats["psnr"], "rfid": first["rfid"]},
            "codebook": {name: {"usage": stats[f"usage_{name}"], "perplexity": stats[f"perplexity_{name}"]}
                         for name in names},
            "prior_nll_bits": nll,
            "per_class": per_class_accuracy(labelled and labelled["fake"].predicted, asked,
                                            labelled and labelled["floor"].predicted, real.floor_labels(),
                                            data.class_names),
            "per_class_independent": independent_judgement(asked, samples_of, real, log),
            "sampling": {k: settings.get(k) for k in ("temperature", "top_k", "top_p", "guidance", "labels", "seed",
                                                      "accept", "threshold", "candidates") if k in settings},
            "eval_seconds": None,
        }
        first16 = list(range(min(16, real.held)))
        save_grid(run.eval_reconstructions, torch.cat([real.floor(first16), recon_of(first16)]), nrow=16)
        usage_plot(run.codebook_usage, recon_stats.histograms)
        report["eval_seconds"] = round(time.perf_counter() - t0, 1)
        pictures = {key: os.path.relpath(path, run.eval) for key, path in (
            ("samples", run.sample_grid), ("reconstructions", run.eval_reconstructions),
            ("codebook_usage", run.codebook_usage), ("sweep", run.sweep_png)) if key != "sweep" or path.exists()}
        atomic_write_text(run.report_json, json.dumps(report, indent=1))
        atomic_write_text(run.report_md, report_markdown(report, str(run), pictures))
        carded = (run.sampler / CONFIG).exists()
        if carded:  # the exported sampler's model card gets these numbers
            record_evaluation(run.sampler, report)
        log(summary_table(report))
        log(f"evaluate: {run.report_json}, {run.report_md} ({report['eval_seconds']} s)"
            + (f"; model card {run.sampler / CARD}" if carded else ""))
        return report

    return on_rank_zero(fabric, write_report)  # a failure there stops every rank with its message


def main(argv=None) -> int:
    parser = stage_parser(
        "evaluate",
        "Score the samples (FID, Inception Score, precision/recall, density/coverage, beside the real-data floor), "
        "the reconstructions and the priors; write RUN/eval/report.json and report.md with pictures.",
        ("fabric", "evaluate"),
        example="evaluate.k=5 evaluate.num_real=500",
    )
    return run_main(lambda cfg, run, args: run_evaluate(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
