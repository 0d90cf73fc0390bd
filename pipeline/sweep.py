"""The truncation trade-off (``make sweep``): sample at several temperatures and top-p values, score each
setting with FID, precision and recall against the same real reference, and plot precision against recall
(Kynkaanniemi et al. 2019: lower temperature or a smaller nucleus buys precision with recall)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data import load_image_data
from pipeline.distributed import on_rank_zero, rank_zero_first, shard_indices
from pipeline.evaluate import _save_fig, features_of, make_extractor, reference_pixels
from pipeline.io import atomic_write_text
from pipeline.metrics import fid_from_features, precision_recall
from pipeline.sample import build_sampler
from pipeline.stage1 import load_vqvae
from pipeline.training import make_fabric


def sweep_settings(cfg: Config) -> list[dict]:
    e = cfg.evaluate
    base = {"temperature": 1.0, "top_k": cfg.sample.top_k, "top_p": 1.0}
    out = [dict(base, temperature=t) for t in e.sweep_temperatures]
    out += [dict(base, top_p=p) for p in e.sweep_top_p if p < 1.0]
    return out


def sweep_plot(path: Path, results: list[dict], floor: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for kind, marker, color in (("temperature", "o", "#3b6ea5"), ("top_p", "s", "#c0504d")):
        pts = [r for r in results if r["vary"] == kind]
        if not pts:
            continue
        ax.plot([r["recall"] for r in pts], [r["precision"] for r in pts], marker=marker, color=color,
                label=f"varying {kind.replace('_', '-')}")
        for r in pts:
            ax.annotate(f"{'T' if kind == 'temperature' else 'p'}={r[kind]:g}\nFID {r['fid']:.3g}",
                        (r["recall"], r["precision"]), textcoords="offset points",
                        xytext=(6, -18 if kind == "top_p" else 4), fontsize=7)
    ax.scatter([floor["recall"]], [floor["precision"]], marker="*", s=140, color="black", label="real held-out")
    ax.set_xlabel("recall (diversity)")
    ax.set_ylabel("precision (quality)")
    xs = [r["recall"] for r in results] + [floor["recall"]]
    ys = [r["precision"] for r in results] + [floor["precision"]]
    ax.set_xlim(max(0.0, min(xs) - 0.08), min(1.02, max(xs) + 0.08))  # zoom on the points, labels need room
    ax.set_ylim(max(0.0, min(ys) - 0.08), min(1.02, max(ys) + 0.08))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Truncation trade-off: precision vs recall")
    fig.tight_layout()
    _save_fig(fig, path)


def run_sweep(cfg: Config, run_dir: Path) -> list[dict] | None:
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    sampler = build_sampler(run_dir)
    _, cfg1, _ = load_vqvae(run_dir)
    fabric = make_fabric(cfg.fabric)
    sampler = sampler.to(fabric.device)
    data = load_image_data(cfg1.data)
    # rank 0 trains (or loads) and caches the domain classifier, then the others load that file
    extractor, _ = rank_zero_first(fabric, lambda: make_extractor(cfg, run_dir, data, log=fabric.print))
    extractor.module.to(fabric.device)
    e, s = cfg.evaluate, cfg.sample
    n = min(e.sweep_num, len(data.train), len(data.holdout))
    f_ref, _ = features_of(fabric, extractor, reference_pixels(data.train, n, seed=0), e.batch_size, "reference")
    f_held, _ = features_of(fabric, extractor, data.holdout.all_pixels(n), e.batch_size, "held-out")
    results = []
    for setting in sweep_settings(cfg):
        indices = shard_indices(n, fabric.global_rank, fabric.world_size)
        part = sampler.generate_samples(len(indices), setting["temperature"], setting["top_k"], setting["top_p"],
                                        s.labels, s.guidance, s.seed, s.batch_size, indices=indices)
        # every rank sampled its shard; features_of expects the full set, so gather pixels through it
        pixels = torch.from_numpy(part.images).permute(0, 3, 1, 2)  # (n_rank, H, W, C) -> (n_rank, C, H, W)
        f_fake = _gathered_features(fabric, extractor, pixels, n, e.batch_size)
        if fabric.global_rank == 0:
            r = {**setting, "vary": "temperature" if setting["top_p"] == 1.0 else "top_p",
                 "fid": fid_from_features(f_ref, f_fake), **precision_recall(f_ref, f_fake, k=e.k)}
            results.append(r)
            fabric.print(f"sweep: T={r['temperature']:g} top_p={r['top_p']:g}: FID {r['fid']:.3g}, precision "
                         f"{r['precision']:.3f}, recall {r['recall']:.3f}")

    def write() -> list[dict]:  # rank 0 only
        floor = {"fid": fid_from_features(f_ref, f_held), **precision_recall(f_ref, f_held, k=e.k)}
        out = run_dir / "eval"
        atomic_write_text(out / "sweep.json", json.dumps({"num": n, "k": e.k, "real_floor": floor,
                                                          "results": results}, indent=1))
        sweep_plot(out / "sweep.png", results, floor)
        fabric.print(f"sweep: {out / 'sweep.json'}, {out / 'sweep.png'} ({time.perf_counter() - t0:.0f} s)")
        return results

    return on_rank_zero(fabric, write)  # a failure there stops every rank with its message


def _gathered_features(fabric, extractor, local_pixels: torch.Tensor, n: int, batch_size: int):
    """Features of images already sharded across ranks (rank r holds images r, r + world, ...)."""
    from pipeline.distributed import gather_rows

    with torch.no_grad():
        feats = [extractor(fabric.to_device(local_pixels[i : i + batch_size]))[0].float().cpu()
                 for i in range(0, len(local_pixels), batch_size)]
    local = torch.cat(feats).numpy() if feats else None
    out = gather_rows(fabric, [local], n)
    return None if out is None else out[0]
