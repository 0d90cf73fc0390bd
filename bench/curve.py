"""Where the time budget buys Inception FID: the default pipeline with one knob changed at a time (stage-1 steps,
stage-2 steps, the priors' width, stage-1 augmentation), each run through ``make stage1 stage2 sample evaluate``'s
stage commands with ``fabric.threads=1``, ``--jobs`` runs side by side (one core each). Writes ``curve.json``,
``curve.md`` (a table) and ``curve.png`` (sample FID against the CPU minutes of stage 1 + stage 2 + sample).

    python -m bench.curve [--out runs/curve] [--jobs 2] [--only default,s2_600] [--config configs/mnist.yaml]

CPU seconds (user + system of each stage process) are the cost axis: with one thread per process they are the
wall time of a quiet core, whatever else the machine runs. Variants that change only stage 2 reuse the default
run's stage 1 (its folder is copied once it is trained; an earlier invocation's default in the same ``--out`` is
reused rather than run again, and the table keeps every variant that finished there). Real-image statistics are
shared through one ``evaluate.reference_dir``. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.common import ROOT, Context, run_child
from pipeline.metrics.report import place_labels

STAGES = ("stage1", "stage2", "sample", "evaluate")

# name -> (overrides, reuse the default run's stage 1?). The default has been stage2.max_steps=1200 with prior
# dropout 0.1 since 2026-12-02 (before: 600 steps, no dropout; the README's table has both).
VARIANTS: dict[str, tuple[list[str], bool]] = {
    "default": ([], False),
    "s1_1000": (["stage1.max_steps=1000"], False),
    "s1_4000": (["stage1.max_steps=4000"], False),
    "s2_300": (["stage2.max_steps=300"], True),
    "s2_600": (["stage2.max_steps=600"], True),
    "s2_2400": (["stage2.max_steps=2400"], True),
    "s1_4000_s2_2400": (["stage1.max_steps=4000", "stage2.max_steps=2400"], False),  # both levers at once
    "no_dropout": (["prior.top.dropout=0", "prior.bottom.dropout=0"], True),
    "dropout_0.2": (["prior.top.dropout=0.2", "prior.bottom.dropout=0.2"], True),
    "prior_256": (["prior.top.n_embd=256", "prior.bottom.n_embd=256"], True),
    "crop_0.9": (["data.crop_scale=0.9"], False),
    "copies_4": (["extract.copies=4"], True),  # the priors see 5x the code grids: 4 shifted copies of each image
}


def run_stage(stage: str, config: str, run_dir: Path, overrides: list[str], logs: Path, name: str) -> dict:
    """One stage command (its output in ``logs/<name>-<stage>.out|.err``): wall and CPU seconds, peak memory, exit."""
    ctx = Context(quick=False, device=torch.device("cpu"), threads=1, threads_forced=True)  # OMP_NUM_THREADS=1
    cmd = [sys.executable, "-m", f"stages.{stage}", "--config", config, "--run", str(run_dir), *overrides]
    child = run_child(cmd, ctx, log_dir=logs, name=f"{name}-{stage}")
    return {"wall_s": child.seconds, "cpu_s": child.cpu_seconds, "peak_rss_mb": child.peak_rss_bytes / 2**20,
            "returncode": child.returncode}


def run_variant(name: str, args: argparse.Namespace, stage1_ready: threading.Event) -> dict:
    try:
        result = _run_variant(name, args, stage1_ready)
        (args.out / f"{name}.result.json").write_text(json.dumps(result, indent=1))
        return result
    finally:
        if name == "default":
            stage1_ready.set()  # also when it failed: the variants waiting for it then say so


def _run_variant(name: str, args: argparse.Namespace, stage1_ready: threading.Event) -> dict:
    overrides, reuse = VARIANTS[name]
    run_dir = args.out / name
    common = ["fabric.threads=1", f"evaluate.reference_dir={args.out / 'reference'}"]
    result = {"name": name, "overrides": overrides, "reused_stage1": reuse, "stages": {}}
    stages = STAGES
    if reuse:
        stage1_ready.wait()
        default = args.out / "default"
        if not (default / "stage1" / "best.ckpt").exists():
            return {**result, "error": "the default run's stage 1 failed"}
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        for part in ("config.yaml", "data", "stage1"):
            src = default / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, run_dir / part)
        result["stages"]["stage1"] = json.loads((args.out / "default.json").read_text())["stage1"]
        stages = STAGES[1:]
    for stage in stages:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {stage}", flush=True)
        out = run_stage(stage, args.config, run_dir, overrides + common, args.out / "logs", name)
        result["stages"][stage] = out
        if name == "default" and stage == "stage1":
            (args.out / "default.json").write_text(json.dumps({"stage1": out}))
            stage1_ready.set()
        if out["returncode"]:
            return {**result, "error": f"{stage} exited {out['returncode']}: see {args.out}/logs/{name}-{stage}.err"}
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    floor, domain = report["real_floor"]["fid"], report.get("domain", report)  # domain: the headline when no Inception
    result["report"] = {
        "fid": report["fid"], "fid_interval": report["interval"]["fid"], "fid_floor": floor,
        "precision": report["precision"], "recall": report["recall"], "kid": report["kid"]["mean"],
        "rfid": report["recon"]["rfid"], "mse": report["recon"]["mse"], "domain_fid": domain["fid"],
        "asked_class": report["per_class"]["asked_class_accuracy"], "prior_nll_bits": report["prior_nll_bits"]}
    return result


def budget_minutes(r: dict) -> float:
    """CPU minutes of the training and sampling stages (evaluation is the same for every variant)."""
    return sum(r["stages"][s]["cpu_s"] for s in ("stage1", "stage2", "sample")) / 60


def write_outputs(results: list[dict], out: Path) -> None:
    (out / "curve.json").write_text(json.dumps(results, indent=1))
    done = [r for r in results if "report" in r]
    header = ("variant", "overrides", "CPU min (stage 1 / 2 / sample)", "held-out MSE", "rFID",
              "sample FID [95%] (x floor)", "precision / recall", "domain FID", "asked class", "prior NLL top / bottom")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(done, key=budget_minutes):
        q, cpu = r["report"], [r["stages"][s]["cpu_s"] / 60 for s in ("stage1", "stage2", "sample")]
        lo, hi = q["fid_interval"]
        cells = (r["name"], " ".join(r["overrides"]) + (" (default stage 1)" if r["reused_stage1"] else "") or "-",
                 f"{sum(cpu):.1f} ({cpu[0]:.1f} / {cpu[1]:.1f} / {cpu[2]:.1f})", f"{q['mse']:.5f}",
                 f"{q['rfid']:.1f}", f"{q['fid']:.1f} [{lo:.1f}, {hi:.1f}] ({q['fid'] / q['fid_floor']:.1f}x)",
                 f"{q['precision']:.2f} / {q['recall']:.2f}", f"{q['domain_fid']:.2f}",
                 f"{100 * q['asked_class']:.1f}%",
                 f"{q['prior_nll_bits']['top']:.2f} / {q['prior_nll_bits']['bottom']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"- {r['name']}: {r['error']}" for r in results if "error" in r]
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not done:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    labels, bars = [], []
    for r in sorted(done, key=budget_minutes):
        x, q = budget_minutes(r), r["report"]
        lo, hi = q["fid_interval"]
        ax.errorbar(x, q["fid"], yerr=[[q["fid"] - lo], [hi - q["fid"]]], fmt="o", capsize=3,
                    color="C1" if r["reused_stage1"] else "C0")
        labels.append(ax.annotate(r["name"], (x, q["fid"]), textcoords="offset points", xytext=(5, 4), fontsize=8))
        bars.append((x, lo, x, hi))
    ax.axhline(done[0]["report"]["fid_floor"], color="gray", ls="--", lw=1, label="real floor")
    ax.axhline(2 * done[0]["report"]["fid_floor"], color="gray", ls=":", lw=1, label="2x floor (target)")
    ax.scatter([], [], color="C0", label="own stage 1")
    ax.scatter([], [], color="C1", label="the default's stage 1")
    ax.set_xlabel("CPU minutes, stage 1 + stage 2 + sample (one thread)")
    ax.set_ylabel("sample Inception FID, N = 1,000")
    ax.set_ylim(bottom=0)
    ax.margins(x=0.15)  # room for the labels of the first and last points
    ax.legend(fontsize=8)
    fig.tight_layout()
    place_labels(ax, labels, bars)
    fig.savefig(out / "curve.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "curve", help="run folders and results")
    parser.add_argument("--jobs", type=int, default=2, help="variants run side by side, one thread each")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild curve.md/png from the variants of --out that finished (their .result.json)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.out = args.out.resolve()
    if args.report_only:
        write_outputs(finished(args.out), args.out)
        return 0
    ready = threading.Event()
    if any(VARIANTS[n][1] for n in names) and "default" not in names:
        if (args.out / "default.result.json").exists():
            ready.set()  # an earlier default run of this --out: its stage 1 is reused as it is
        else:
            names.insert(0, "default")  # the variants that reuse its stage 1 need it
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:  # default first, so its stage 1 is ready early
        list(pool.map(lambda n: run_variant(n, args, ready), names))
    write_outputs(finished(args.out), args.out)  # with the variants of earlier invocations
    return 0


def finished(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.result.json"))]


if __name__ == "__main__":
    raise SystemExit(main())
