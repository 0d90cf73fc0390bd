"""Benchmark: the parameter memory of a stage-2 prior per rank, DDP against FSDP with one unit per block, on two
processes of this machine (``bench/fsdp_worker.py`` under torchrun). Counted bytes, not timings: the figures are
the same on any machine for a given model."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from bench.common import Context, Result, Row, compare, run_child

MB = 1e6


def _measure(ctx: Context, strategy: str, folder: Path, overrides: list[str]) -> list[dict] | str:
    out = folder / f"{strategy}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bench.fsdp_worker", str(out), strategy, *overrides]
    child = run_child(cmd, ctx, timeout=600, log_dir=folder, name=strategy)
    if child.returncode != 0 or not out.is_file():
        return f"failed: {child.error_tail()}"
    return json.loads(out.read_text())


def bench_fsdp(ctx: Context) -> Result:
    overrides: list[str] = []  # the default config's bottom prior (GPT-2, 4 blocks of width 128)
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        ddp, fsdp = (_measure(ctx, s, Path(tmp), overrides) for s in ("ddp", "fsdp"))
    if isinstance(ddp, str) or isinstance(fsdp, str):
        return Result([Row("fsdp", "prior parameter bytes per rank", fsdp if isinstance(fsdp, str) else ddp)])
    ddp_bytes = max(r["local_bytes"] for r in ddp)
    fsdp_bytes = max(r["local_bytes"] for r in fsdp)
    largest = max(fsdp[0]["units"]) * 4  # float32
    rows = [
        compare("fsdp", "prior parameter bytes per rank, FSDP vs DDP (2 processes)", fsdp_bytes / MB,
                ddp_bytes / MB, "MB", higher_is_better=False, min_ratio=1.8,
                note="bottom prior of the default config; sum of the local parameter (shard) sizes after "
                     "fabric.setup, largest rank"),
        compare("fsdp", "largest FSDP unit gathered at once vs the whole prior", largest / MB,
                fsdp[0]["model_bytes"] / MB, "MB", higher_is_better=False,
                note=f"{len(fsdp[0]['units'])} units: one per transformer block and the root (embeddings, head)"),
    ]
    return Result(rows, settings={"overrides": overrides, "processes": 2}, details={"ddp": ddp, "fsdp": fsdp})
