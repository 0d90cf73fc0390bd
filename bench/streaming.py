"""Benchmark: stage 1 streamed from an image folder (data.streaming=always) with 2 processes, on 2,000 and 20,000
synthetic 16 px PNGs: each rank's peak memory and the seconds to the first step, which should not grow with the
folder; the same start-up with the images decoded up front (data.streaming=never) for the larger folder; and the
rate of one DataLoader worker (decode + fit, and with augmentation) beside the training rate of the run."""

from __future__ import annotations

import csv
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import ROOT, Context, Result, Row, compare, failure, run_child, scaled, time_interleaved

SIZES = (2_000, 20_000)
BATCH, WORKERS = 64, 2
MEMORY_RATIO = 0.87  # the larger folder's peak memory per rank within 15% of the smaller one's (1 / 1.15)


def _stage1(ctx: Context, folder: Path, base: Path, name: str, steps: int, streaming: str = "always") -> dict:
    """The 2-process stage-1 command on ``folder`` through tests/stream_helper.py; per rank the seconds to its
    first step and its peak memory, and the logged training rates (img/s, both processes)."""
    log, run_dir = base / f"log-{name}", base / f"run-{name}"
    cmd = [ctx.python, "-m", "tests.stream_helper", str(log), "--", "--config", str(ROOT / "configs" / "smoke.yaml"),
           "--run", str(run_dir), "fabric.devices=2", "data.source=folder", f"data.path={folder}",
           f"data.streaming={streaming}", f"data.num_workers={WORKERS}", "data.max_images=0",
           f"stage1.batch_size={BATCH}", f"stage1.max_steps={steps}", "stage1.log_every=5",
           f"stage1.eval_every={steps}", f"stage1.checkpoint_every={steps}"]
    child = run_child(cmd, ctx, timeout=1800, log_dir=base, name=name)
    if child.returncode != 0:
        raise RuntimeError(f"{name}: exit {child.returncode}: {child.error_tail(3)}")
    first = [json.loads((log / f"rank{r}.json").read_text()) for r in range(2)]
    end = [json.loads((log / f"rank{r}-end.json").read_text()) for r in range(2)]
    with open(run_dir / "stage1" / "logs" / "version_0" / "metrics.csv") as fh:
        rates = [float(r["train/img_per_s"]) for r in csv.DictReader(fh) if r.get("train/img_per_s")]
    return {"startup_s": [f["seconds"] for f in first], "decoded_before_step1": [f["own"] + f["setup"] for f in first],
            "peak_rss_bytes": [e["peak_rss_bytes"] for e in end], "img_per_s": rates, "wall_s": child.seconds}


def _worker_rates(ctx: Context, folder: Path, quick: bool) -> dict:
    """Images per second of one worker's work, in this process: decode + fit, and decode + fit + augment."""
    from pipeline.config import DataConfig
    from pipeline.streaming import StreamedTraining, load_stream_data, stream_listing

    cfg = DataConfig(source="folder", path=str(folder), image_size=16, streaming="always")
    files = load_stream_data(cfg, stream_listing(cfg)).train
    train = StreamedTraining(files, hflip=True, crop_scale=0.8, seed=0)
    picks = [(i, 0) for i in range(BATCH * 4)]
    timings = time_interleaved({"decode+fit": lambda: files.__getitems__([i for i, _ in picks]),
                                "decode+fit+augment": lambda: train.__getitems__(picks)},
                               ctx.device, warmup=1, repeats=3 if quick else 7)
    return {k: scaled(t, invert=len(picks)) for k, t in timings.items()}


def _listing_seconds(ctx: Context, folders: dict[int, Path]) -> dict[int, float | str]:
    """Seconds to list a folder and split its files (what a streamed start does before the model), per size."""
    from pipeline.config import DataConfig
    from pipeline.streaming import load_stream_data, stream_listing

    def listing(folder: Path):
        cfg = DataConfig(source="folder", path=str(folder), image_size=16, streaming="always")
        return lambda: load_stream_data(cfg, stream_listing(cfg))

    timings = time_interleaved({n: listing(f) for n, f in folders.items()}, ctx.device, warmup=1, repeats=3)
    return {n: scaled(t) for n, t in timings.items()}


def bench_streaming(ctx: Context) -> Result:
    from tests.stream_helper import png_folder

    steps = 20 if ctx.quick else 60
    rows: list[Row] = []
    details: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        base = Path(tmp)
        folders = {n: png_folder(base / f"imgs-{n}", n) for n in SIZES}
        small, large = SIZES
        runs = {}
        for n in SIZES:
            try:
                runs[n] = _stage1(ctx, folders[n], base, f"stream-{n}", steps)
            except Exception as exc:  # a failed run is a result
                runs[n] = failure(exc)
        try:
            runs["never"] = _stage1(ctx, folders[large], base, f"memory-{large}", steps, streaming="never")
        except Exception as exc:
            runs["never"] = failure(exc)
        details["runs"] = runs
        details["worker_img_per_s"] = rates = _worker_rates(ctx, folders[small], ctx.quick)
        details["listing_s"] = listed = _listing_seconds(ctx, folders)

    def figure(run, key: str, rank: int, scale: float = 1.0):
        return run if isinstance(run, str) else run[key][rank] * scale

    for r in range(2):
        rows.append(compare("streaming", f"peak RSS rank {r}: {large:,} vs {small:,} files",
                            figure(runs[large], "peak_rss_bytes", r, 1 / 2**20),
                            figure(runs[small], "peak_rss_bytes", r, 1 / 2**20), "MB", higher_is_better=False,
                            min_ratio=MEMORY_RATIO, note="target: within 15%"))
    rows.append(compare("streaming", f"seconds to step 1 (rank 0): {large:,} vs {small:,} files",
                        figure(runs[large], "startup_s", 0), figure(runs[small], "startup_s", 0), "s",
                        higher_is_better=False))
    rows.append(compare("streaming", f"seconds to step 1 (rank 0), {large:,} files: streamed vs decoded first",
                        figure(runs[large], "startup_s", 0), figure(runs["never"], "startup_s", 0), "s",
                        higher_is_better=False, note="baseline: data.streaming=never (every image decoded and "
                        "cached before step 1)"))
    rows.append(compare("streaming", f"list + split the folder: {large:,} vs {small:,} files", listed[large],
                        listed[small], "s", higher_is_better=False))
    for name, rate in rates.items():
        rows.append(Row("streaming", f"one worker, {name} (16 px PNG)", rate, unit="img/s"))
    train = runs[large]
    rows.append(Row("streaming", f"stage-1 training rate, 2 processes x {WORKERS} workers (smoke model, 16 px)",
                    train if isinstance(train, str) else statistics.median(train["img_per_s"][1:] or
                                                                           train["img_per_s"]), unit="img/s"))
    settings = {"sizes": SIZES, "batch_size": BATCH, "num_workers": WORKERS, "steps": steps, "processes": 2,
                "config": "configs/smoke.yaml", "image": "16 px grey PNG, 2 class folders"}
    return Result(rows, settings, details)
