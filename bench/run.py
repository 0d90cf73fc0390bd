"""Run the benchmarks on this machine (CUDA when present, else CPU), write ``bench/results.json`` and print a table.

    python -m bench.run [--quick] [--only NAME[,NAME]] [--out PATH] [--threads N]

Every speed figure is the median of several repeats after warm-up; every comparison is measured side by side
in the same run (repeats interleaved) and reported as a ratio, > 1 meaning ours is better. Benchmarks are not
tests: nothing is asserted, a missed target is only reported.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, Context, Result, Row, failure
from pipeline.card import cpu_name


def _prdc(ctx: Context) -> Result:
    from bench.metrics import bench_prdc

    with tempfile.TemporaryDirectory(prefix="bench-prdc-") as tmp:
        return bench_prdc(ctx, Path(tmp))


def _lazy(module: str, function: str) -> Callable[[Context], Result]:
    def call(ctx: Context) -> Result:
        return getattr(importlib.import_module(module), function)(ctx)

    return call


BENCHMARKS: dict[str, tuple[Callable[[Context], Result], str]] = {
    "quantizer": (_lazy("bench.quantizer", "bench_quantizer"), "VectorQuantizer vs vector_quantize_pytorch"),
    "stage1": (_lazy("bench.training", "bench_stage1"), "VQ-VAE-2 training img/s: fp32, channels_last, bf16, compile"),
    "priors": (_lazy("bench.training", "bench_priors"), "GPT and PixelCNN prior training tok/s"),
    "sampling": (_lazy("bench.sampling", "bench_sampling"), "sampling img/s with and without the cache"),
    "kvcache": (_lazy("bench.sampling", "bench_kv_cache"), "GPT sampling seq/s: dynamic vs static KV cache vs static + "
                "torch.compile"),
    "prdc": (_prdc, "precision/recall vs the prdc package: time, memory, agreement"),
    "fid": (_lazy("bench.metrics", "bench_fid"), "fid_from_features on 5,000 x 2048-d"),
    "inception": (_lazy("bench.metrics", "bench_inception"), "FID Inception ms/img: torch contiguous, channels_last, "
                  "onnxruntime; the clean resize of grey images"),
    "fsdp": (_lazy("bench.fsdp", "bench_fsdp"), "prior parameter bytes per rank: DDP vs FSDP on 2 processes"),
    "e2e": (_lazy("bench.e2e", "bench_e2e"), "the four stages from nothing, with the report's quality figures"),
    "streaming": (_lazy("bench.streaming", "bench_streaming"), "stage 1 streamed from 2,000 vs 20,000 files: memory, "
                  "start-up, loader rate"),
}


# ------------------------------------------------------------------------------------------------ environment


def git_commit() -> str | None:
    """The checked-out commit, read from .git without running git (None when there is no repository). In a
    worktree .git is a file naming its git dir, whose ``commondir`` holds the branches."""
    git = ROOT / ".git"
    try:
        if git.is_file():
            git = (ROOT / git.read_text().split("gitdir:", 1)[1].strip()).resolve()
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        for folder in (git, common):
            if (folder / ref).is_file():
                return (folder / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(ctx: Context) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": str(ctx.device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": ctx.threads,
        "threads_forced": ctx.threads_forced,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "vector-quantize-pytorch", "prdc",
                                                "torchmetrics", "numpy", "scikit-learn", "onnxruntime", "onnx")},
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if ctx.device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(ctx.device)
        env["cuda_version"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------------------------ table


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a == 0:
        text = "0"
    elif a >= 1000:
        text = f"{v:,.0f}"
    elif a >= 100:
        text = f"{v:.0f}"
    elif a >= 10:
        text = f"{v:.1f}"
    elif a >= 0.01:
        text = f"{v:.3g}"
    else:
        text = f"{v:.2e}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    header = ("benchmark", "figure", "ours", "theirs/baseline", "ratio", "target", "met?")
    cells = [header]
    notes = []
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        met = "" if r.met is None else ("yes" if r.met else "NO")
        mark = ""
        if r.note:
            notes.append(r.note)
            mark = f" [{len(notes)}]"
        cells.append((r.benchmark, r.figure + mark, fmt(r.ours, r.unit), fmt(r.baseline, r.unit), ratio, r.target,
                      met))
    width = [min(max(len(c[i]) for c in cells), 60) for i in range(len(header))]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, width)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in width))
    lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks: " + "; ".join(f"{k} ({v[1]})" for k, v in BENCHMARKS.items()))
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes, fewer repeats, no torch.compile, e2e on configs/smoke.yaml (< 5 min)")
    parser.add_argument("--only", default="", help="comma-separated subset, e.g. --only quantizer,prdc")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where to write the JSON")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads here and in child processes (default: torch's default)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = names
    return args


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = Context(quick=args.quick, device=device, threads=torch.get_num_threads(), threads_forced=bool(args.threads))
    out = Path(args.out)
    payload: dict[str, Any] = {"mode": "quick" if args.quick else "full", "environment": environment(ctx),
                               "benchmarks": {}}
    all_rows: list[Row] = []
    t_start = time.perf_counter()
    print(f"bench: {payload['mode']} run on {device} ({ctx.threads} threads), {', '.join(args.names)}",
          file=sys.stderr)
    for name in args.names:
        fn, _ = BENCHMARKS[name]
        t0 = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            result = fn(ctx)
        except Exception as exc:  # one broken benchmark must not lose the others
            traceback.print_exc()
            result = Result([Row(name, "(benchmark)", failure(exc))], details={"traceback": traceback.format_exc()})
        seconds = time.perf_counter() - t0
        print(f"bench: {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
        all_rows += result.rows
        payload["benchmarks"][name] = {"seconds": seconds, "settings": result.settings,
                                       "rows": [asdict(r) for r in result.rows], "details": result.details}
        payload["total_seconds"] = time.perf_counter() - t_start
        write_results(out, payload)  # after every benchmark, so an interrupted run keeps what it measured
    payload["environment"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload["total_seconds"] = time.perf_counter() - t_start
    write_results(out, payload)
    env = payload["environment"]
    print(f"\n{payload['mode']} run, {env['date']}, commit {(env['git_commit'] or 'unknown')[:12]}, torch "
          f"{env['versions']['torch']}, {device} ({env['cpu'] if device.type == 'cpu' else env.get('cuda_device')}), "
          f"{ctx.threads} threads, {payload['total_seconds']:.0f} s in all\n")
    print(table(all_rows))
    print(f"\nratio: how many times better ours is (> 1: ours wins). Results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
