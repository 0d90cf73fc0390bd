"""Stage 4: score the samples and the models, and write one report.

Sample quality (FID, Inception Score, precision/recall, density/coverage) is measured in the feature space of
the chosen extractor against a reference set of N real *train* images; the real-data floor is the same
metrics for N real *held-out* images against that same reference, so both numbers share N and reference.
Reconstructions (MSE, PSNR, rFID: held-out originals vs their reconstructions), codebooks (usage and
perplexity per level over the held-out pass) and priors (held-out NLL in bits per code per level) complete it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.codes import CodeSet, load_manifest
from pipeline.config import Config
from pipeline.data import ImageSet, load_image_data, to_float, to_uint8
from pipeline.distributed import gather_rows, on_rank_zero, rank_zero_first, shard_indices
from pipeline.images import save_grid
from pipeline.io import UserError, atomic_write_text
from pipeline.metrics import fid_from_features, inception_score_from_logits, precision_recall
from pipeline.stage1 import level_names, load_vqvae, reconstruction_metrics
from pipeline.stage2 import check_priors_match, heldout_nll_bits, load_prior
from pipeline.training import make_fabric

METRIC_KEYS = ("precision", "recall", "density", "coverage")


@dataclass
class Extractor:
    name: str
    module: torch.nn.Module
    has_logits: bool

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, C, H, W) -> features (B, D) and logits (B, classes) or None."""
        if self.name == "domain":
            feats = self.module.features(to_float(pixels))
            return feats, self.module.head(feats)
        return self.module(pixels), None


def make_extractor(cfg: Config, run_dir: Path, data, log=print) -> tuple[Extractor, dict]:
    e = cfg.evaluate
    if e.extractor == "domain":
        from pipeline.metrics.classifier import load_or_train_classifier

        model, acc = load_or_train_classifier(run_dir / "eval" / "classifier.ckpt", data.train, data.holdout,
                                              data.num_classes, e.classifier_steps, e.classifier_batch_size, log=log)
        return Extractor("domain", model, True), {"classifier_heldout_accuracy": acc}
    from pipeline.metrics.features import INCEPTION_ENV_VAR, InceptionFeatures

    path = e.inception_path or os.environ.get(INCEPTION_ENV_VAR, "")
    if not path or not Path(path).is_file():
        raise UserError(f"evaluate.extractor=inception needs the FID Inception weights file (evaluate."
                        f"inception_path={path!r} not found); see README 'Inception weights offline', or use "
                        "evaluate.extractor=domain")
    return Extractor("inception", InceptionFeatures(path), False), {}


def features_of(fabric, extractor: Extractor, pixels: torch.Tensor, batch_size: int, desc: str):
    """Features (and logits) of uint8 images (N, C, H, W), computed in batches on each rank's shard and gathered
    so every rank count gives the same numbers. Returns numpy arrays on rank 0 (None elsewhere)."""
    from tqdm.auto import tqdm

    idx = shard_indices(len(pixels), fabric.global_rank, fabric.world_size)
    feats, logits = [], []
    for start in tqdm(range(0, len(idx), batch_size), desc=desc, leave=False, disable=fabric.global_rank != 0):
        f, lg = extractor(fabric.to_device(pixels[idx[start : start + batch_size]]))
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    arrays = [torch.cat(feats).numpy()] + ([torch.cat(logits).numpy()] if logits else [])
    out = gather_rows(fabric, arrays, len(pixels))
    if out is None:
        return None, None
    return out[0], (out[1] if len(out) > 1 else None)


def quality(ref: np.ndarray, other: np.ndarray, logits: np.ndarray | None, k: int) -> dict[str, Any]:
    out: dict[str, Any] = {"fid": fid_from_features(ref, other)}
    out.update(precision_recall(ref, other, k=k))
    if logits is not None:
        mean, std = inception_score_from_logits(logits, splits=10 if len(logits) >= 100 else 1)
        out["inception_score"] = {"mean": mean, "std": std}
    else:
        out["inception_score"] = "unavailable: the inception extractor has no classifier head"
    return out


def load_samples(run_dir: Path) -> dict[str, np.ndarray]:
    path = Path(run_dir) / "samples" / "samples.npz"
    if not path.exists():
        raise UserError(f"no samples at {path}; run `make sample` (python -m stages.sample --run {run_dir}) first")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def reference_pixels(images: ImageSet, n: int, seed: int) -> torch.Tensor:
    idx = np.random.default_rng(seed).permutation(len(images))[:n]
    return images.__getitems__(sorted(idx.tolist()))[0]


def usage_plot(path: Path, histograms: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histograms), figsize=(5 * len(histograms), 3.2), squeeze=False)
    for ax, (name, hist) in zip(axes[0], histograms.items()):
        used = (hist > 0).mean()
        ax.bar(np.arange(len(hist)), np.sort(hist)[::-1], width=1.0, color="#3b6ea5")
        ax.set_title(f"{name} codebook: {used:.0%} of {len(hist)} codes used")
        ax.set_xlabel("codes, most used first")
        ax.set_ylabel("held-out count")
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import io as _io

    import matplotlib.pyplot as plt

    from pipeline.io import atomic_write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


@torch.no_grad()
def code_histograms(model, holdout: ImageSet, device) -> dict[str, np.ndarray]:
    names = level_names(model.levels)
    k = model.cfg.codebook_size
    hist = {n: np.zeros(k, np.int64) for n in names}
    for start in range(0, len(holdout), 500):
        pixels, _ = holdout.__getitems__(list(range(start, min(start + 500, len(holdout)))))
        for n, c in zip(names, model.encode(to_float(pixels.to(device)))):
            hist[n] += np.bincount(c.flatten().cpu().numpy(), minlength=k)
    return hist


def run_evaluate(cfg: Config, run_dir: Path) -> dict | None:
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    e = cfg.evaluate
    samples = load_samples(run_dir)
    vqvae, cfg1, stage1_path = load_vqvae(run_dir)
    names = level_names(vqvae.levels)
    priors = {n: load_prior(run_dir, n) for n in names}
    check_priors_match(stage1_path, [meta for _, meta in priors.values()], run_dir)
    fabric = make_fabric(cfg.fabric)
    log = fabric.print
    data = load_image_data(cfg1.data)
    out_dir = run_dir / "eval"
    # rank 0 trains (or loads) and caches the domain classifier, then the others load that file
    extractor, extractor_info = rank_zero_first(fabric, lambda: make_extractor(cfg, run_dir, data, log=log))
    extractor.module.to(fabric.device)

    fake = torch.from_numpy(samples["images"]).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    n = min(len(fake), len(data.holdout), len(data.train), e.num_real or len(fake))
    if n < e.k + 1:
        raise UserError(f"only {n} images to compare (samples {len(fake)}, held-out {len(data.holdout)}); "
                        f"need more than evaluate.k={e.k}")
    ref = reference_pixels(data.train, n, seed=0)
    held = data.holdout.all_pixels(n)
    f_ref, _ = features_of(fabric, extractor, ref, e.batch_size, "features: train reference")
    f_fake, l_fake = features_of(fabric, extractor, fake[:n], e.batch_size, "features: samples")
    f_held, l_held = features_of(fabric, extractor, held, e.batch_size, "features: held-out")

    # reconstructions (rFID: held-out originals vs their reconstructions), codebooks, priors
    vqvae = vqvae.to(fabric.device)
    recon_stats = reconstruction_metrics(fabric, vqvae, data.holdout)
    with torch.no_grad():
        recon = torch.cat([to_uint8(vqvae(to_float(held[i : i + 250].to(fabric.device))).reconstruction).cpu()
                           for i in range(0, n, 250)])
    f_rec, _ = features_of(fabric, extractor, recon, e.batch_size, "features: reconstructions")
    manifest = load_manifest(run_dir / "codes")
    codes_holdout = CodeSet(run_dir / "codes", "holdout", manifest)
    nll = {}
    for level, name in enumerate(names):
        prior, meta = priors[name]
        prior = prior.to(fabric.device)
        nll[name] = heldout_nll_bits(fabric, prior, codes_holdout, level, prior.num_classes)
        if level > 0:
            nll[f"{name}_shuffled_{names[level - 1]}"] = heldout_nll_bits(
                fabric, prior, codes_holdout, level, prior.num_classes, shuffle_cond=True)

    def write_report() -> dict:  # rank 0 only: the metrics, pictures and report files
        model_q = quality(f_ref, f_fake, l_fake, e.k)
        floor_q = quality(f_ref, f_held, l_held, e.k)
        settings = json.loads(str(samples["settings"])) if "settings" in samples else {}
        report: dict[str, Any] = {
            **model_q,
            "num_samples": int(n),
            "feature_extractor": extractor.name,
            **extractor_info,
            "k": e.k,
            "real_floor": floor_q,
            "recon": {"mse": recon_stats["mse"], "psnr": recon_stats["psnr"], "rfid": fid_from_features(f_held, f_rec)},
            "codebook": {name: {"usage": recon_stats[f"usage_{name}"], "perplexity": recon_stats[f"perplexity_{name}"]}
                         for name in names},
            "prior_nll_bits": nll,
            "sampling": {k: settings.get(k) for k in ("temperature", "top_k", "top_p", "guidance", "labels", "seed")},
            "eval_seconds": None,
        }
        # pictures
        save_grid(out_dir / "reconstructions.png", torch.cat([held[:16], recon[:16]]), nrow=16)
        usage_plot(out_dir / "codebook_usage.png", code_histograms(vqvae, data.holdout, fabric.device))
        report["eval_seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1))
        atomic_write_text(out_dir / "report.md", report_markdown(report, run_dir))
        log(summary_table(report))
        log(f"evaluate: {out_dir / 'report.json'}, {out_dir / 'report.md'} ({report['eval_seconds']} s)")
        return report

    return on_rank_zero(fabric, write_report)  # a failure there stops every rank with its message


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.3f} ± {v['std']:.3f}"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, str) and v.startswith("unavailable"):
        return "unavailable (no classifier head)"
    return str(v)


def summary_table(report: dict) -> str:
    rows = [("metric", "samples", "real floor")]
    for key in ("fid", "inception_score", *METRIC_KEYS):
        rows.append((key, _fmt(report[key]), _fmt(report["real_floor"][key])))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    recon = report["recon"]
    lines.append(f"recon: mse {recon['mse']:.4g}, psnr {recon['psnr']:.2f} dB, rFID {recon['rfid']:.3g}; codebook "
                 + ", ".join(f"{n} {v['usage']:.0%} used (perplexity {v['perplexity']:.0f})"
                             for n, v in report["codebook"].items()))
    lines.append("prior NLL (bits/code): " + ", ".join(f"{k} {v:.3f}" for k, v in report["prior_nll_bits"].items()))
    return "\n".join(lines)


def report_markdown(report: dict, run_dir: Path) -> str:
    lines = [
        f"# Evaluation report: {run_dir}",
        "",
        f"{report['num_samples']} samples vs {report['num_samples']} real train images in the feature space of the "
        f"`{report['feature_extractor']}` extractor"
        + (f" (held-out accuracy {report['classifier_heldout_accuracy']:.2%})"
           if "classifier_heldout_accuracy" in report else "")
        + f"; k = {report['k']} for precision/recall/density/coverage. The real floor is the same metrics for "
        f"{report['num_samples']} real held-out images against the same reference.",
        "",
        "| metric | samples | real floor |",
        "|---|---|---|",
    ]
    for key in ("fid", "inception_score", *METRIC_KEYS):
        lines.append(f"| {key} | {_fmt(report[key])} | {_fmt(report['real_floor'][key])} |")
    recon = report["recon"]
    lines += ["", "## Reconstruction and codebooks", "",
              f"Held-out MSE {recon['mse']:.4g} (on [-1, 1]), PSNR {recon['psnr']:.2f} dB, rFID {recon['rfid']:.4g}.",
              "", "| level | codes used | perplexity | prior NLL (bits/code) |", "|---|---|---|---|"]
    for name, v in report["codebook"].items():
        lines.append(f"| {name} | {v['usage']:.1%} | {v['perplexity']:.1f} | {report['prior_nll_bits'][name]:.3f} |")
    shuffled = {k: v for k, v in report["prior_nll_bits"].items() if "_shuffled_" in k}
    for k, v in shuffled.items():
        lines.append(f"\nNLL of the {k.split('_shuffled_')[0]} prior with the {k.split('_shuffled_')[1]} codes "
                     f"shuffled across images: {v:.3f} bits/code (conditioning is used when this is higher).")
    s = report["sampling"]
    lines += ["", "## Sampling settings", "", ", ".join(f"{k} = {v}" for k, v in s.items()), "",
              "## Pictures", "", "Samples:", "", "![samples](../samples/grid.png)", "",
              "Held-out originals (top) and reconstructions (bottom):", "", "![reconstructions](reconstructions.png)",
              "", "Codebook usage per level:", "", "![codebook usage](codebook_usage.png)", ""]
    if (Path(run_dir) / "eval" / "sweep.png").exists():
        lines += ["Precision against recall over sampling settings (`make sweep`):", "", "![sweep](sweep.png)", ""]
    lines.append(f"Evaluation took {report['eval_seconds']} s.")
    return "\n".join(lines) + "\n"
