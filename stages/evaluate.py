"""Stage 4: score the samples and the models, and write one report.

Sample quality (FID, KID, Inception Score, precision/recall, density/coverage) is measured in the feature space
of the headline extractor (the standard FID Inception network by default) and, beside it, of the domain
classifier, each against a reference set of N real *train* images; the real-data floor is the same metrics
for N real *held-out* images against that same reference, so both numbers share N and reference.
Reconstructions (MSE, PSNR, rFID: held-out originals vs their reconstructions), codebooks (usage and
perplexity per level over the held-out pass) and priors (held-out NLL in bits per code per level) complete it.

    python -m stages.evaluate --config configs/mnist.yaml [key=value ...]
"""

import json
import os
import sys
import time
from typing import Any

import torch

from pipeline.codes import CodeSet, file_sha256
from pipeline.config import Config
from pipeline.data import load_image_data, real_provenance, seeded_subset, to_float, to_uint8
from pipeline.distributed import on_rank_zero, rank_zero_first
from pipeline.export import CARD, CONFIG, record_evaluation
from pipeline.fabric import make_fabric
from pipeline.images import save_grid
from pipeline.io import UserError, atomic_write_text
from pipeline.metrics import fid_from_features
from pipeline.metrics.extract import PROTOCOL, features_of, make_extractor, reference_features
from pipeline.metrics.reconstruction import reconstruction_stats
from pipeline.metrics.report import per_class_accuracy, quality, report_markdown, summary_table, usage_plot
from pipeline.priors.likelihood import heldout_nll_bits
from pipeline.vqvae import level_names
from stages.cli import run_main, stage_parser
from stages.runfolder import RunFolder, load_codes, load_priors, load_samples, load_vqvae


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


def extracted(fabric, extractor, e, data, cfg1, run: RunFolder, fake, held, recon, n: int, stage1_sha: str) -> dict:
    """Features (and logits) of the train reference, the samples, the held-out images and their reconstructions
    in one extractor's space (real ones and reconstructions cached per data, N, weights and stage-1 model), and
    the seconds it took. Rank 0 gets arrays, the other ranks None."""
    t0, d, cache, bs = time.perf_counter(), cfg1.data, run.reference_cache, e.batch_size
    extractor.module.to(fabric.device)
    f_ref, _ = reference_features(fabric, extractor, lambda: seeded_subset(data.train, n, seed=0), n, bs, cache,
                                  real_provenance(data, d, "train"), f"{extractor.name}: train reference")
    f_fake, l_fake = features_of(fabric, extractor, fake[:n], n, bs, f"{extractor.name}: samples")
    f_held, l_held = reference_features(fabric, extractor, lambda: held, n, bs, cache,
                                        real_provenance(data, d, "holdout"), f"{extractor.name}: held-out")
    f_rec, _ = reference_features(fabric, extractor, lambda: recon, n, bs, cache,
                                  {**real_provenance(data, d, "holdout"), "split": "recon", "stage1": stage1_sha},
                                  f"{extractor.name}: reconstructions")
    return {"ref": f_ref, "fake": f_fake, "l_fake": l_fake, "held": f_held, "l_held": l_held, "rec": f_rec,
            "seconds": time.perf_counter() - t0}


def scores(x: dict, e) -> dict:
    """One extractor's metrics: samples and real floor against the same reference, and the reconstructions' FID."""
    return {**quality(x["ref"], x["fake"], x["l_fake"], e.k, e.bootstrap),
            "real_floor": quality(x["ref"], x["held"], x["l_held"], e.k, e.bootstrap),
            "rfid": fid_from_features(x["held"], x["rec"])}


def run_evaluate(cfg: Config, run: RunFolder) -> dict | None:
    t0 = time.perf_counter()
    e = cfg.evaluate
    samples = load_samples(run)
    vqvae, cfg1, stage1_path = load_vqvae(run)
    names = level_names(vqvae.levels)
    priors = load_priors(run, vqvae.levels, stage1_path)
    fabric = make_fabric(cfg.fabric)
    log = fabric.print
    data = rank_zero_first(fabric, lambda: load_image_data(cfg1.data, cache_dir=run.data_cache))
    kinds = [e.extractor] + (["domain"] if e.extractor == "inception" and e.domain_column else [])
    # rank 0 trains (or loads) and caches the domain classifier, or installs the Inception weights; then the others
    extractors = [rank_zero_first(fabric, lambda k=k: make_extractor(k, e, run.classifier, data, log=log))
                  for k in kinds]

    images = samples.take(range(len(samples)), ["images"])["images"]
    fake = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    n = min(len(fake), len(data.holdout), len(data.train), e.num_real or len(fake))
    if n < e.k + 1:
        raise UserError(f"only {n} images to compare (samples {len(fake)}, held-out {len(data.holdout)}); "
                        f"need more than evaluate.k={e.k}")
    held, held_labels = data.holdout.all_pixels(n), data.holdout.labels[:n].numpy()

    # reconstructions (rFID: held-out originals vs their reconstructions), codebooks, priors
    vqvae = vqvae.to(fabric.device)
    recon_stats = reconstruction_stats(fabric, vqvae, data.holdout)
    with torch.no_grad():
        recon = torch.cat([to_uint8(vqvae(to_float(held[i : i + 250].to(fabric.device))).reconstruction).cpu()
                           for i in range(0, n, 250)])
    sha = file_sha256(stage1_path)
    feats = {ex.name: extracted(fabric, ex, e, data, cfg1, run, fake, held, recon, n, sha) for ex, _ in extractors}
    nll = prior_nll(fabric, priors, load_codes(run, "holdout"), names)

    def write_report() -> dict:  # rank 0 only: the metrics, pictures and report files
        stats = recon_stats.metrics
        settings = samples.settings
        (head, head_info), *rest = extractors
        first = scores(feats[head.name], e)
        labelled = feats.get("domain")  # the per-class rows need the domain classifier's logits
        report: dict[str, Any] = {
            **{k: v for k, v in first.items() if k != "rfid"},
            "num_samples": int(n),
            "feature_extractor": head.name,
            **head_info,
            "k": e.k,
            "bootstrap_rounds": e.bootstrap,
            "protocol": {ex.name: PROTOCOL[ex.name] for ex, _ in extractors},
            "feature_seconds": {name: round(x["seconds"], 1) for name, x in feats.items()},
            **{ex.name: {**scores(feats[ex.name], e), **info} for ex, info in rest},
            "recon": {"mse": stats["mse"], "psnr": stats["psnr"], "rfid": first["rfid"]},
            "codebook": {name: {"usage": stats[f"usage_{name}"], "perplexity": stats[f"perplexity_{name}"]}
                         for name in names},
            "prior_nll_bits": nll,
            "per_class": per_class_accuracy(labelled and labelled["l_fake"], samples.labels()[:n],
                                            labelled and labelled["l_held"], held_labels, data.class_names),
            "sampling": {k: settings.get(k) for k in ("temperature", "top_k", "top_p", "guidance", "labels", "seed")},
            "eval_seconds": None,
        }
        save_grid(run.eval_reconstructions, torch.cat([held[:16], recon[:16]]), nrow=16)
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
