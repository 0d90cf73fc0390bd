"""Benchmark 7: the whole pipeline from nothing, one stage entry point after the other in a fresh run folder
(``python -m stages.<stage> --config <preset> --run <temp dir>``): wall time per stage, then the quality figures
of the report that evaluation writes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.common import ROOT, Context, Result, Row, run_child

STAGES = ("stage1", "stage2", "sample", "evaluate")


def _overrides(ctx: Context) -> list[str]:
    out = []
    if ctx.device.type == "cuda":
        out.append("fabric.accelerator=cuda")
    if ctx.threads_forced:
        out.append(f"fabric.threads={ctx.threads}")
    return out


def _quality_rows(name: str, report: dict, quick: bool) -> list[Row]:
    floor = report.get("real_floor", {})
    rows = []
    smoke = "smoke config (20 steps per stage, 16 px): checks the pipeline runs, its quality means nothing; " \
        "the full run trains configs/mnist.yaml"
    for key, label in (("fid", "FID (samples | real floor)"), ("precision", "precision (samples | real floor)"),
                       ("recall", "recall (samples | real floor)")):
        rows.append(Row(name, label, report.get(key), floor.get(key), "", note=smoke if quick and key == "fid" else ""))
    recon = report.get("recon", {})
    rows.append(Row(name, "recon MSE (held-out, [-1, 1] scale)", recon.get("mse"), None, "",
                    note=f"PSNR {recon.get('psnr', float('nan')):.2f} dB, rFID {recon.get('rfid', float('nan')):.3g}"))
    for level, v in report.get("codebook", {}).items():
        rows.append(Row(name, f"codebook usage, {level}", 100 * v["usage"], None, "%",
                        note=f"perplexity {v['perplexity']:.0f}"))
    return rows


def bench_e2e(ctx: Context) -> Result:
    config = "configs/smoke.yaml" if ctx.quick else "configs/mnist.yaml"
    name = f"e2e ({Path(config).name})"
    rows: list[Row] = []
    details: dict = {"stages": {}}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        run_dir = Path(tmp) / "run"
        total = 0.0
        for stage in STAGES:
            cmd = [ctx.python, "-m", f"stages.{stage}", "--config", config, "--run", str(run_dir), *_overrides(ctx)]
            if stage == "evaluate":  # from nothing: no real-set statistics from the shared cache of earlier runs
                cmd.append(f"evaluate.reference_dir={Path(tmp) / 'reference'}")
            child = run_child(cmd, ctx, timeout=1800, log_dir=Path(tmp) / "logs", name=stage)
            details["stages"][stage] = {"seconds": child.seconds, "returncode": child.returncode,
                                        "peak_rss_bytes": child.peak_rss_bytes}
            if child.returncode != 0:
                reason = "timed out" if child.timed_out else f"exit {child.returncode}: {child.error_tail()}"
                rows.append(Row(name, f"{stage} wall time", f"failed: {reason}"))
                details["stages"][stage]["stderr_tail"] = child.stderr[-4000:]
                return Result(rows, {"config": config}, details)
            total += child.seconds
            rows.append(Row(name, f"{stage} wall time", child.seconds, None, "s",
                            note=f"peak RSS {child.peak_rss_bytes / 1e9:.2f} GB"))
        rows.append(Row(name, "total wall time", total, None, "s"))
        report_path = run_dir / "eval" / "report.json"
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        details["report"] = report
        rows += _quality_rows(name, report, ctx.quick)
    settings = {"config": config, "command": "python -m stages.<stage> --config <config> --run <fresh temp dir> "
                + " ".join(_overrides(ctx)), "cwd": str(ROOT),
                "note": "a single run: wall times include process start-up, data loading and checkpointing"}
    return Result(rows, settings, details)
