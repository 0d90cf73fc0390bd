"""Benchmarks 5 and 6: precision/recall/density/coverage against the ``prdc`` package (time, memory peak,
agreement), and the compute time of FID, on random 2048-d features; and the FID Inception network's speed per
runtime (torch contiguous, channels_last, onnxruntime) with their features' agreement."""

from __future__ import annotations

from pathlib import Path

from bench.common import ROOT, Context, Result, Row, Timing, compare, run_child, scaled, time_interleaved
from bench.prdc_worker import DIM, K, features

GB = 1e9
PRDC_SPEED_TARGET = 5.0  # ours at least 5x faster than prdc at N = 5,000
PRDC_SPEED_N = 5_000
LARGE_N = 50_000
LARGE_N_MEMORY_TARGET_GB = 4.0  # "feasible in a few GB"


def _machine_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def prdc_peak_bytes(n: int) -> int:
    """A lower bound of the ``prdc`` package's peak for n real and n fake points, on top of the inputs: the
    (n, n) float32 distance matrix of a set plus the (n, n) int64 index array ``np.argpartition`` returns for
    it (kept alive by the ``[..., :k]`` view), 12 n^2 bytes. (Its real-vs-fake pass holds 4 n^2 + n^2.)
    sklearn's chunked float64 work buffers and thread pools come on top."""
    return 12 * n * n


def _measure(ctx: Context, impl: str, n: int, repeats: int, timeout: float, log_dir: Path) -> dict:
    cmd = [ctx.python, "-m", "bench.prdc_worker", "--impl", impl, "--n", str(n), "--repeats", str(repeats),
           "--device", str(ctx.device)]
    child = run_child(cmd, ctx, timeout=timeout, log_dir=log_dir, name=f"prdc-{impl}-{n}")
    out = child.reported()
    out.update(timed_out=child.timed_out, returncode=child.returncode, wall_s=child.seconds,
               peak_rss_bytes=max(child.peak_rss_bytes, out.get("rss_peak_self_bytes", 0)))
    if child.returncode not in (0, None):
        out["error"] = f"failed: exit {child.returncode}: {child.error_tail()}"
    if "times_s" in out:
        times = sorted(out["times_s"])
        out["median_s"] = times[len(times) // 2]
    return out


def _cell_time(m: dict, timeout: float) -> float | str:
    if "median_s" in m:
        return m["median_s"]
    if m.get("timed_out"):
        return f"> {timeout:.0f} s (stopped)"
    return m.get("error", "failed")


def _extra_gb(m: dict) -> float | str:
    """The memory the computation itself added: peak RSS minus the RSS after set-up (inputs loaded)."""
    if "rss_setup_bytes" not in m:
        return m.get("error", "failed")
    return (m["peak_rss_bytes"] - m["rss_setup_bytes"]) / GB


def bench_prdc(ctx: Context, log_dir: Path) -> Result:
    sizes = [2_000] if ctx.quick else [PRDC_SPEED_N, 20_000]
    rows: list[Row] = []
    details: dict = {}
    last_ours_time: tuple[int, float] | None = None
    tie_note = "prdc uses < where the papers (and ours) use <=: they differ only on exact distance ties"
    for n in sizes:
        repeats = 3 if n <= PRDC_SPEED_N else 1
        budget_ours, budget_prdc = 900.0, (150.0 if n > PRDC_SPEED_N else 900.0)
        ours = _measure(ctx, "ours", n, repeats, budget_ours, log_dir)
        theirs = _measure(ctx, "prdc", n, repeats, budget_prdc, log_dir)
        details[f"n={n}"] = {"ours": ours, "prdc": theirs}
        t_ours, t_theirs = _cell_time(ours, budget_ours), _cell_time(theirs, budget_prdc)
        note = f"median of {repeats}" if repeats > 1 else "single run each"
        if ctx.threads_forced:
            note += f"; prdc's sklearn runs n_jobs=8 threads whatever --threads {ctx.threads} says"
        if isinstance(t_ours, float):
            last_ours_time = (n, t_ours)
        if isinstance(t_theirs, str) and theirs.get("timed_out") and f"n={sizes[0]}" in details and n != sizes[0]:
            first = details[f"n={sizes[0]}"]["prdc"]
            if "median_s" in first:
                estimate = first["median_s"] * (n / sizes[0]) ** 2
                note += f"; prdc stopped at the budget, ~{estimate:.0f} s estimated from N={sizes[0]:,} x N^2"
        target = PRDC_SPEED_TARGET if n == PRDC_SPEED_N else None
        if ctx.quick:
            note += f"; the >= {PRDC_SPEED_TARGET:g}x target is defined at N={PRDC_SPEED_N:,} (full run only)"
        rows.append(compare("precision/recall", f"time, N={n:,} x {DIM}-d, k={K}", t_ours, t_theirs, "s",
                            higher_is_better=False, min_ratio=target, note=note))
        mem_note = (f"peak RSS minus RSS with the inputs loaded; total peak ours {ours['peak_rss_bytes'] / GB:.2f} GB,"
                    f" prdc {theirs['peak_rss_bytes'] / GB:.2f} GB"
                    + (" (at the stop)" if theirs.get("timed_out") else "")
                    + f"; prdc's N x N arrays alone (12 N^2 bytes): {prdc_peak_bytes(n) / GB:.2f} GB")
        if "cuda_peak_bytes" in ours:
            mem_note += f"; ours GPU peak {ours['cuda_peak_bytes'] / GB:.2f} GB"
        rows.append(compare("precision/recall", f"extra peak memory, N={n:,}", _extra_gb(ours), _extra_gb(theirs),
                            "GB", higher_is_better=False, note=mem_note))
        if "values" in ours and "values" in theirs:
            diff = max(abs(ours["values"][k] - theirs["values"][k]) for k in ours["values"])
            rows.append(Row("precision/recall", f"max |ours - prdc| of P/R/D/C, N={n:,}", diff, None, "",
                            note=tie_note + "; ours " + ", ".join(f"{k[0].upper()} {v:.4f}"
                                                                for k, v in ours["values"].items())))
        else:
            rows.append(Row("precision/recall", f"max |ours - prdc| of P/R/D/C, N={n:,}",
                            "n/a: prdc did not finish", None, "", note=tie_note))
    if not ctx.quick:
        rows.append(_large_n(ctx, log_dir, last_ours_time, details))
    settings = {"dim": DIM, "k": K, "features": "float32 N(0,1) real vs N(0.1,1) fake, same seed for both",
                "sizes": sizes, "memory": "peak RSS (VmHWM) of a fresh child process per measurement",
                "prdc_package": "prdc.compute_prdc (sklearn pairwise_distances, n_jobs=8)"}
    return Result(rows, settings, details)


def _large_n(ctx: Context, log_dir: Path, last_ours_time: tuple[int, float] | None, details: dict) -> Row:
    """N = 50,000: ours in a child with a time budget (its memory peak is reached within the first blocks);
    prdc's peak analytically."""
    budget = 30.0
    ours = _measure(ctx, "ours", LARGE_N, 1, budget, log_dir)
    details[f"n={LARGE_N}"] = {"ours": ours, "prdc_analytic_peak_bytes": prdc_peak_bytes(LARGE_N)}
    machine = _machine_memory_bytes()
    prdc_gb = prdc_peak_bytes(LARGE_N) / GB
    note = (f"prdc (analytic, not run): one N x N float32 matrix is {4 * LARGE_N**2 / GB:.0f} GB (float64 "
            f"{8 * LARGE_N**2 / GB:.0f} GB); its peak is at least 12 N^2 = {prdc_gb:.0f} GB (distances + "
            f"argpartition's int64 indices)"
            + (f" > this machine's {machine / GB:.0f} GB" if machine and machine < prdc_peak_bytes(LARGE_N) else ""))
    if ours.get("timed_out"):
        ours_gb: float | str = ours["peak_rss_bytes"] / GB
        note = (f"ours stopped after {budget:.0f} s: its memory peak (inputs, one 256 MiB distance block) comes in "
                f"the first seconds; the last pass adds two boolean chunk x N masks, ~0.13 GB"
                + (f"; full time ~{last_ours_time[1] * (LARGE_N / last_ours_time[0]) ** 2:.0f} s estimated "
                   f"from N={last_ours_time[0]:,} x N^2" if last_ours_time else "") + "; " + note)
    elif "median_s" in ours:
        ours_gb = ours["peak_rss_bytes"] / GB
        note = f"ours finished in {ours['median_s']:.0f} s; " + note
    else:
        ours_gb = ours.get("error", "failed")
    met = isinstance(ours_gb, float) and ours_gb <= LARGE_N_MEMORY_TARGET_GB
    if "cuda_peak_bytes" in ours:
        note = f"ours GPU peak {ours['cuda_peak_bytes'] / GB:.2f} GB; " + note
    return Row("precision/recall", f"peak memory, N={LARGE_N:,} (ours: total RSS; prdc: analytic)", ours_gb,
               f">= {prdc_gb:.0f} GB", "GB", target=f"<= {LARGE_N_MEMORY_TARGET_GB:g} GB", met=met, note=note)


def bench_fid(ctx: Context) -> Result:
    from pipeline.metrics.fid import fid_from_features

    n = 5_000
    import torch

    real, fake = (torch.from_numpy(f).to(ctx.device) for f in features(n, DIM, seed=1))
    warmup, repeats = (1, 3) if ctx.quick else (1, 5)
    value: dict[str, float] = {}

    def run() -> None:
        value["fid"] = fid_from_features(real, fake)

    t = time_interleaved({"fid": run}, ctx.device, warmup, repeats)["fid"]
    row = Row("FID", f"fid_from_features, {n:,} vs {n:,} x {DIM}-d", scaled(t), None, "s",
              note=f"FID = {value['fid']:.3f}" if "fid" in value else "")
    settings = {"n": n, "dim": DIM, "warmup": warmup, "repeats": repeats, "features": "float32 N(0,1) vs N(0.1,1)"}
    return Result([row], settings, {"fid": t.to_dict() if isinstance(t, Timing) else t, **value})


def _inception_networks(batch: int):
    """The FID Inception network under each runtime, as callables on one preprocessed batch (B, 3, 299, 299) in
    the TF input range (digit-like grey images through clean-fid's resize), and that batch."""
    import torch

    from pipeline.metrics.features import InceptionFeatures, _load_torchscript, install_inception, resize_clean

    path = install_inception(ROOT / "weights")
    net = _load_torchscript(path)
    onnx = InceptionFeatures(path, runtime="onnxruntime").onnx  # exported once and cached beside the file
    grey = (torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) ** 4 * 255).to(torch.uint8)
    x = (resize_clean(grey) / 128 - 1).expand(-1, 3, -1, -1).contiguous()  # (B, 3, 299, 299)
    return {"torch contiguous": lambda: net(x),
            "torch channels_last": lambda: net(x.contiguous(memory_format=torch.channels_last)),
            "onnxruntime": lambda: onnx(x)}, x


def _resize_rows(ctx: Context, batch: int, warmup: int, repeats: int) -> list[Row]:
    """clean-fid's resize of grey 28 x 28 images to 299 x 299: one channel (now) against each of three (before)."""
    import numpy as np
    import torch

    from pipeline.metrics.features import _resize_channel, resize_clean

    grey = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rgb = grey.expand(-1, 3, -1, -1).numpy().astype(np.float32)
    t = time_interleaved({"once": lambda: resize_clean(grey).expand(-1, 3, -1, -1),
                          "per channel": lambda: np.stack([[_resize_channel(c, 299) for c in im] for im in rgb])},
                         ctx.device, warmup, repeats)
    return [compare("inception", f"resize_clean, grey 28x28 -> 299, batch {batch}: once vs per channel",
                    scaled(t["once"], 1e3 / batch), scaled(t["per channel"], 1e3 / batch), "ms/img",
                    higher_is_better=False, note="the same floats bit for bit (tests/test_metrics.py)")]


def bench_inception(ctx: Context) -> Result:
    """ms per image of the FID Inception network: TorchScript with a contiguous and a channels_last input, and its
    ONNX export in onnxruntime (CPU); their features' largest difference."""
    import torch

    batch = 16 if ctx.quick else 64
    warmup, repeats = (1, 2) if ctx.quick else (1, 3)
    fns, x = _inception_networks(batch)
    with torch.no_grad():
        timings = time_interleaved(fns, torch.device("cpu"), warmup, repeats)
        feats = {name: fn().float() for name, fn in fns.items() if isinstance(timings[name], Timing)}
    base = scaled(timings["torch contiguous"], 1e3 / batch)
    rows = [Row("inception", f"torch contiguous, batch {batch}", base, None, "ms/img",
                note="the baseline of the inception ratios: the TorchScript file as it was run before")]
    ref = feats.get("torch contiguous")
    for name in ("torch channels_last", "onnxruntime"):
        diff = ""
        if ref is not None and name in feats:
            diff = (f"; features differ from torch contiguous by at most {float((feats[name] - ref).abs().max()):.2e}"
                    f" (largest feature {float(ref.abs().max()):.2f})")
        rows.append(compare("inception", f"{name}, batch {batch}", scaled(timings[name], 1e3 / batch), base,
                            "ms/img", higher_is_better=False, note=f"{torch.get_num_threads()} threads" + diff))
    rows += _resize_rows(ctx, batch, warmup, repeats + 2)
    settings = {"batch": batch, "warmup": warmup, "repeats": repeats, "threads": torch.get_num_threads(),
                "input": "grey 28x28 images, clean-fid resize to 299x299, (x - 128) / 128, repeated to RGB",
                "onnx": "torch.onnx.export (TorchScript-based, opset 17, dynamic batch), CPUExecutionProvider"}
    details = {n: (t.to_dict() if isinstance(t, Timing) else t) for n, t in timings.items()}
    return Result(rows, settings, {**details, "input_shape": list(x.shape)})
