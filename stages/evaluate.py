"""Stage 4: score the samples and the models, and write one report.

Sample quality (FID, Inception Score, precision/recall, density/coverage) is measured in the feature space of
the chosen extractor against a reference set of N real *train* images; the real-data floor is the same
metrics for N real *held-out* images against that same reference, so both numbers share N and reference.
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

from pipeline.codes import CodeSet
from pipeline.config import Config
from pipeline.data import load_image_data, real_provenance, seeded_subset, to_float, to_uint8
from pipeline.distributed import on_rank_zero, rank_zero_first
from pipeline.export import CARD, CONFIG, record_evaluation
from pipeline.fabric import make_fabric
from pipeline.images import save_grid
from pipeline.io import UserError, atomic_write_text
from pipeline.metrics import fid_from_features
from pipeline.metrics.extract import features_of, make_extractor, reference_features
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
    # rank 0 trains (or loads) and caches the domain classifier, then the others load that file
    extractor, extractor_info = rank_zero_first(fabric, lambda: make_extractor(e, run.classifier, data, log=log))
    extractor.module.to(fabric.device)

    fake = torch.from_numpy(samples["images"]).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    n = min(len(fake), len(data.holdout), len(data.train), e.num_real or len(fake))
    if n < e.k + 1:
        raise UserError(f"only {n} images to compare (samples {len(fake)}, held-out {len(data.holdout)}); "
                        f"need more than evaluate.k={e.k}")
    held, held_labels = data.holdout.all_pixels(n), data.holdout.labels[:n].numpy()
    ref_cache, d = run.reference_cache, cfg1.data
    f_ref, _ = reference_features(fabric, extractor, lambda: seeded_subset(data.train, n, seed=0), n, e.batch_size,
                                  ref_cache, real_provenance(data, d, "train"), "features: train reference")
    f_fake, l_fake = features_of(fabric, extractor, fake[:n], n, e.batch_size, "features: samples")
    f_held, l_held = reference_features(fabric, extractor, lambda: held, n, e.batch_size, ref_cache,
                                        real_provenance(data, d, "holdout"), "features: held-out")

    # reconstructions (rFID: held-out originals vs their reconstructions), codebooks, priors
    vqvae = vqvae.to(fabric.device)
    recon_stats = reconstruction_stats(fabric, vqvae, data.holdout)
    with torch.no_grad():
        recon = torch.cat([to_uint8(vqvae(to_float(held[i : i + 250].to(fabric.device))).reconstruction).cpu()
                           for i in range(0, n, 250)])
    f_rec, _ = features_of(fabric, extractor, recon, n, e.batch_size, "features: reconstructions")
    nll = prior_nll(fabric, priors, load_codes(run, "holdout"), names)

    def write_report() -> dict:  # rank 0 only: the metrics, pictures and report files
        stats = recon_stats.metrics
        settings = json.loads(str(samples["settings"])) if "settings" in samples else {}
        report: dict[str, Any] = {
            **quality(f_ref, f_fake, l_fake, e.k, e.bootstrap),
            "num_samples": int(n),
            "feature_extractor": extractor.name,
            **extractor_info,
            "k": e.k,
            "bootstrap_rounds": e.bootstrap,
            "real_floor": quality(f_ref, f_held, l_held, e.k, e.bootstrap),
            "recon": {"mse": stats["mse"], "psnr": stats["psnr"], "rfid": fid_from_features(f_held, f_rec)},
            "codebook": {name: {"usage": stats[f"usage_{name}"], "perplexity": stats[f"perplexity_{name}"]}
                         for name in names},
            "prior_nll_bits": nll,
            "per_class": per_class_accuracy(l_fake, samples["labels"][:n], l_held, held_labels, data.class_names),
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
