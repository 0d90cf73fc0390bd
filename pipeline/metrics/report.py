"""The evaluation report: sample quality against a real reference (FID, Inception Score, precision/recall,
density/coverage) and its real-data floor, as a console table and a Markdown page, and the plots beside it
(codebook usage, the truncation sweep's precision against recall)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import atomic_write_bytes
from pipeline.metrics.moments import fid_from_moments, inception_score_from_sums
from pipeline.metrics.prdc import precision_recall
from pipeline.metrics.reduced import Reduced
from pipeline.metrics.uncertainty import bootstrap_fid, bootstrap_share, kid_from_features

METRIC_KEYS = ("precision", "recall", "density", "coverage")
SHOWN_KEYS = ("fid", "kid", "inception_score", *METRIC_KEYS)  # the rows of the report's table


def quality(ref: Reduced, other: Reduced, k: int, rounds: int = 0, seed: int = 0) -> dict[str, Any]:
    """FID (from both sets' moments), the Inception Score (from ``other``'s per-split sums), and from the gathered
    features KID (mean and std over subsets) and precision/recall/density/coverage of ``other`` against ``ref``;
    with ``rounds`` > 0, 95% bootstrap intervals of FID, precision and recall. Rank 0 only."""
    out: dict[str, Any] = {"fid": fid_from_moments(ref.moments, other.moments),
                           "kid": kid_from_features(ref.features, other.features, seed=seed)}
    prdc = precision_recall(ref.features, other.features, k=k, points=True)
    precise, recalled = prdc.pop("precise"), prdc.pop("recalled")
    out.update(prdc)
    if rounds:
        out["interval"] = {"fid": bootstrap_fid(ref.features, other.features, rounds, seed, estimate=out["fid"]),
                           "precision": bootstrap_share(precise, 10 * rounds, seed),
                           "recall": bootstrap_share(recalled, 10 * rounds, seed)}
    if other.scores is not None:
        mean, std = inception_score_from_sums(other.scores)
        out["inception_score"] = {"mean": mean, "std": std}
    else:
        out["inception_score"] = "unavailable: the inception extractor has no classifier head"
    return out


def per_class_accuracy(logits: np.ndarray | None, labels: np.ndarray, real_logits: np.ndarray | None,
                       real_labels: np.ndarray, class_names: list[str] | None) -> dict[str, Any] | None:
    """The share of class-conditional samples the domain classifier assigns to the asked class, per class and in
    all, beside the same share for real held-out images of each class (its floor). ``logits`` (N, classes) or
    the predicted classes (N,). None when the samples are unconditional or the extractor has no classifier head."""
    if not class_names or logits is None or real_logits is None or not (labels >= 0).any():
        return None

    def share(lg: np.ndarray, lab: np.ndarray) -> tuple[float | None, int]:
        hit = (lg.argmax(1) if lg.ndim == 2 else lg) == lab
        return (float(hit.mean()) if len(hit) else None), int(len(hit))

    rows = []
    for i, name in enumerate(class_names):
        acc, n = share(logits[labels == i], labels[labels == i])
        real, n_real = share(real_logits[real_labels == i], real_labels[real_labels == i])
        rows.append({"class": name, "samples": n, "asked_class_accuracy": acc, "real": n_real, "real_accuracy": real})
    asked = labels >= 0
    return {"asked_class_accuracy": share(logits[asked], labels[asked])[0],
            "real_accuracy": share(real_logits, real_labels)[0], "classes": rows}


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
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def sweep_plot(path: Path, results: list[dict], floor: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    labels = []
    series = (("temperature", "o", "#3b6ea5", "T", "varying temperature"), ("top_p", "s", "#c0504d", "p",
              "varying top-p"), ("guidance", "D", "#8064a2", "g", "varying guidance"),
              ("accept", "^", "#4f8f3a", "a", "rejection sampling, acceptance a"))
    for kind, marker, color, short, label in series:
        pts = [r for r in results if r["vary"] == kind]
        if not pts:
            continue
        ax.plot([r["recall"] for r in pts], [r["precision"] for r in pts], marker=marker, color=color, label=label)
        labels += [ax.annotate(f"{short}={r[kind]:g}\nFID {r['fid']:.3g}", (r["recall"], r["precision"]),
                               textcoords="offset points", xytext=(6, 4), fontsize=7) for r in pts]
    ax.scatter([floor["recall"]], [floor["precision"]], marker="*", s=140, color="black", label="real held-out")
    ax.set_xlabel("recall (diversity)")
    ax.set_ylabel("precision (quality)")
    xs = [r["recall"] for r in results] + [floor["recall"]]
    ys = [r["precision"] for r in results] + [floor["precision"]]
    ax.set_xlim(max(0.0, min(xs) - 0.08), min(1.02, max(xs) + 0.08))  # zoom on the points, labels need room
    ax.set_ylim(max(0.0, min(ys) - 0.08), min(1.02, max(ys) + 0.08))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Sampling knobs: precision vs recall")
    fig.tight_layout()
    place_labels(ax, labels)
    save_figure(fig, path)


def place_labels(ax, labels: list, obstacles: list[tuple[float, float, float, float]] = ()) -> None:
    """Move each point's annotation (``ax.annotate`` with offset points) beside its marker: right of it, centred,
    else a step above or below, else left of it, whichever position first overlaps no label placed before, no
    marker, no obstacle (x0, y0, x1, y1 in data units, e.g. error bars) and not the legend, inside the axes; the least
    overlapping one when none is free. Call after the limits and layout are final."""
    renderer = ax.figure.canvas.get_renderer()
    inside, to_px = ax.get_window_extent(renderer), ax.transData.transform
    taken = [(x - 5, y - 5, x + 5, y + 5) for x, y in (to_px(a.xy) for a in labels)]
    for x0, y0, x1, y1 in obstacles:
        (a0, b0), (a1, b1) = to_px((x0, y0)), to_px((x1, y1))
        taken.append((min(a0, a1) - 2, min(b0, b1), max(a0, a1) + 2, max(b0, b1)))
    if ax.get_legend() is not None:
        taken.append(tuple(ax.get_legend().get_window_extent(renderer).extents))
    pt = renderer.points_to_pixels(1.0)

    def cost(box) -> float:
        area = sum(max(0, min(box[2], t[2]) - max(box[0], t[0])) * max(0, min(box[3], t[3]) - max(box[1], t[1]))
                   for t in taken)
        out = (max(0, inside.x0 - box[0]) + max(0, box[2] - inside.x1) + max(0, inside.y0 - box[1])
               + max(0, box[3] - inside.y1))
        return area + 1e3 * out

    for label in labels:
        label.set_verticalalignment("bottom")
        half = label.get_window_extent(renderer).height / pt / 2  # points
        best = None
        for side in (1, -1):
            for step in (0, 1, -1, 2, -2, 3, -3):
                label.set_horizontalalignment("left" if side > 0 else "right")
                label.xyann = (6 * side, -half + step * (half + 5))
                e = label.get_window_extent(renderer)
                box = (e.x0 - 1, e.y0 - 1, e.x1 + 1, e.y1 + 1)
                c = cost(box)
                if best is None or c < best[0]:
                    best = (c, label.get_horizontalalignment(), label.xyann, box)
                if c == 0:
                    break
            if best[0] == 0:
                break
        _, align, offset, box = best
        label.set_horizontalalignment(align)
        label.xyann = offset
        taken.append(box)


def _cell(side: dict, key: str) -> str:
    """A metric of one side of the report, with its bootstrap interval when there is one."""
    interval = side.get("interval", {}).get(key)
    return _fmt(side[key]) + (f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "")


def _fmt(v: Any) -> str:
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.4g} ± {v['std']:.2g}"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    if isinstance(v, str) and v.startswith("unavailable"):
        return "unavailable (no classifier head)"
    return str(v)


def speed_text(speed: dict) -> str:
    """An extractor's speed in words: images through the network (the cached real sets are not), at what rate."""
    rate = f"{speed['images_per_s']:.3g} images/s" if speed["images_per_s"] else "no time measured"
    return f"{speed['images']} images through the network in {speed['seconds']} s, {rate}, {speed['runtime']}"


def summary_table(report: dict) -> str:
    sides = _sides(report)
    rows = [("metric", *(n for n, _ in sides))]
    for key in SHOWN_KEYS:
        rows.append((key, *(_cell(side, key) for _, side in sides)))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
    recon = report["recon"]
    rfid = f"rFID {recon['rfid']:.3g}" + (f" ({report['domain']['rfid']:.3g} domain)" if "domain" in report else "")
    lines.append(f"recon: mse {recon['mse']:.4g}, psnr {recon['psnr']:.2f} dB, {rfid}; codebook "
                 + ", ".join(f"{n} {v['usage']:.0%} used (perplexity {v['perplexity']:.0f})"
                             for n, v in report["codebook"].items()))
    lines.append("prior NLL (bits/code): " + ", ".join(f"{k} {v:.3f}" for k, v in report["prior_nll_bits"].items()))
    if report.get("feature_speed"):
        lines.append("features: " + "; ".join(f"{name} {speed_text(v)}" for name, v in report["feature_speed"].items()))
    for key, judge in (("per_class", "domain classifier"), ("per_class_independent", "independent SVM")):
        if per := report.get(key):
            lines.append(f"asked class ({judge}): {per['asked_class_accuracy']:.1%} of samples (real held-out "
                         f"{per['real_accuracy']:.1%}); per class: " + ", ".join(
                             f"{r['class']} {_pct(r['asked_class_accuracy'])}/{_pct(r['real_accuracy'])}"
                             for r in per["classes"]))
    return "\n".join(lines)


def per_class_lines(per: dict, judge: str) -> list[str]:
    """One judge's asked-class shares as a sentence and a per-class Markdown table."""
    return [f"The share of samples {judge} assigns to the class they were asked for: "
            f"{per['asked_class_accuracy']:.1%} in all, against {per['real_accuracy']:.1%} of the real "
            "held-out images it classifies correctly (the floor).", "",
            "| class | samples | recognised as asked | real held-out | recognised |", "|---|---|---|---|---|",
            *(f"| {r['class']} | {r['samples']} | {_pct(r['asked_class_accuracy'])} | {r['real']} | "
              f"{_pct(r['real_accuracy'])} |" for r in per["classes"])]


def floor_images(report: dict) -> str:
    """The real floor's images in words: N held-out, or held-out topped up with train images (evaluate.num_real
    above the held-out set's size)."""
    split = report.get("real_floor_images") or {"holdout": report["num_samples"], "train": 0}
    if not split["train"]:
        return f"{report['num_samples']} real held-out images"
    return (f"{report['num_samples']} real images ({split['holdout']} held-out, {split['train']} train images "
            "outside the reference)")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _sides(report: dict) -> list[tuple[str, dict]]:
    """(column name, metrics) of the table: the headline's samples and floor, then the domain column's if any."""
    name = report["feature_extractor"]
    sides = [(f"samples ({name})", report), (f"real floor ({name})", report["real_floor"])]
    if "domain" in report:
        sides += [("samples (domain)", report["domain"]), ("real floor (domain)", report["domain"]["real_floor"])]
    return sides


def metrics_table(report: dict) -> list[str]:
    """The metrics of samples and real floor, per extractor, as Markdown table lines (the report, the model card)."""
    sides = _sides(report)
    lines = ["| metric | " + " | ".join(n for n, _ in sides) + " |", "|---" * (len(sides) + 1) + "|"]
    return lines + [f"| {key} | " + " | ".join(_cell(side, key) for _, side in sides) + " |" for key in SHOWN_KEYS]


def report_markdown(report: dict, title: str, pictures: dict[str, str]) -> str:
    """The report as Markdown. ``pictures``: relative links of the ``samples``, ``reconstructions`` and
    ``codebook_usage`` images, and ``sweep`` when a sweep plot exists."""
    domain = report.get("domain", report if report["feature_extractor"] == "domain" else {})
    lines = [
        f"# Evaluation report: {title}",
        "",
        f"{report['num_samples']} samples vs {report['num_samples']} real train images in the feature space of the "
        f"`{report['feature_extractor']}` extractor"
        + (" (the headline), and of the `domain` classifier beside it" if "domain" in report else "")
        + (f" (held-out accuracy {domain['classifier_heldout_accuracy']:.2%})"
           if "classifier_heldout_accuracy" in domain else "")
        + f"; k = {report['k']} for precision/recall/density/coverage. The real floor is the same metrics for "
        f"{floor_images(report)} against the same reference. KID is the mean ± standard "
        "deviation over 100 random subsets of half the images; [brackets] are 95% bootstrap intervals: FID ± 1.96 "
        f"standard deviations of FID over {report.get('bootstrap_rounds', 0)} resamplings of both sets, and the "
        "percentile interval of precision and recall over resamplings of their per-image in/out indicators.",
        "",
        *metrics_table(report),
        "",
        *[f"- `{name}` features: {text}; {report['feature_seconds'][name]:.0f} s for this evaluation"
          + (f" ({speed_text(report['feature_speed'][name])})." if name in report.get("feature_speed", {}) else ".")
          for name, text in report.get("protocol", {}).items()],
    ]
    recon = report["recon"]
    rfid = f"rFID {recon['rfid']:.4g}" + (f" ({domain['rfid']:.4g} in the domain features)" if "rfid" in domain else "")
    lines += ["", "## Reconstruction and codebooks", "",
              f"Held-out MSE {recon['mse']:.4g} (on [-1, 1]), PSNR {recon['psnr']:.2f} dB, {rfid}.",
              "", "| level | codes used | perplexity | prior NLL (bits/code) |", "|---|---|---|---|"]
    for name, v in report["codebook"].items():
        lines.append(f"| {name} | {v['usage']:.1%} | {v['perplexity']:.1f} | {report['prior_nll_bits'][name]:.3f} |")
    shuffled = {k: v for k, v in report["prior_nll_bits"].items() if "_shuffled_" in k}
    for k, v in shuffled.items():
        lines.append(f"\nNLL of the {k.split('_shuffled_')[0]} prior with the {k.split('_shuffled_')[1]} codes "
                     f"shuffled across images: {v:.3f} bits/code (conditioning is used when this is higher).")
    if per := report.get("per_class"):
        lines += ["", "## Per class", "", *per_class_lines(per, "the domain classifier")]
    if per := report.get("per_class_independent"):
        lines += ["", f"By an independent judge, {per['judge']}, fitted on {per['fitted_on']} train images:", "",
                  *per_class_lines(per, "the judge")]
    s = report["sampling"]
    lines += ["", "## Sampling settings", "", ", ".join(f"{k} = {v}" for k, v in s.items()), "",
              "## Pictures", "", "Samples:", "", f"![samples]({pictures['samples']})", "",
              "Held-out originals (top) and reconstructions (bottom):", "",
              f"![reconstructions]({pictures['reconstructions']})", "", "Codebook usage per level:", "",
              f"![codebook usage]({pictures['codebook_usage']})", ""]
    if "sweep" in pictures:
        lines += ["Precision against recall over sampling settings (`make sweep`):", "",
                  f"![sweep]({pictures['sweep']})", ""]
    lines.append(f"Evaluation took {report['eval_seconds']} s.")
    return "\n".join(lines) + "\n"
