"""Helper of tests/test_multiprocess.py, started by torchrun the way cluster users start the stages:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.mp_helper OUT.json \
        NAME DIR [key=value ...] [-- NAME DIR [key=value ...] ...]

Every rank runs the real stage-1 code (``stages.stage1.run_stage1`` on configs/smoke.yaml with
fabric.devices=2, so ``make_fabric`` sees the torchrun environment and launches nothing itself) once per
``NAME DIR overrides`` group, one run after the other in the same two processes (the process group is set up by the
first run's Fabric and reused by the others', as Fabric does when it finds one; each run seeds itself from its
config, so the order does not matter): one launch instead of one per strategy or precision. ``fit`` is wrapped to
keep the task's model, a fingerprint of every batch the rank trained on, and a hash of the model's state
(parameters and buffers: codebooks, EMA counts and sums, restart counters) at the start of every step, before DDP's
forward re-broadcasts rank 0's buffers (which would hide a quantizer that fails to synchronise). After ``fit`` each
rank hashes every tensor of its state; everything is all-gathered and rank 0 writes ``{NAME: [rank 0's record,
rank 1's]}`` to OUT.json for the test to compare. Before each run rank 0 prints ``mp_helper: run NAME``, so a test
can tell the runs' output apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

MARK = "mp_helper: run "


def state_hashes(module: torch.nn.Module) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()}


def groups(args: list[str]) -> list[tuple[str, Path, list[str]]]:
    """``NAME DIR [key=value ...] [-- NAME DIR ...]`` -> [(name, dir, overrides), ...]; positional (torchrun would
    take --run for its own option)."""
    out, group = [], []
    for arg in [*args, "--"]:
        if arg != "--":
            group.append(arg)
            continue
        name, run, *overrides = group
        out.append((name, Path(run), overrides))
        group = []
    return out


def run_and_record(name: str, run: Path, overrides: list[str]) -> dict:
    import stages.stage1 as stage1
    from pipeline.config import load_config
    from stages.runfolder import RunFolder

    cfg = load_config("configs/smoke.yaml", ["fabric.devices=2", *overrides])
    captured: dict = {"batches": [], "steps": []}
    real_fit = stage1.fit

    def fit_and_capture(fabric, task, *a, **kw):
        captured["fabric"], captured["model"] = fabric, task.model
        step_fn = task.training_step

        def training_step(fabric, model, batch, step):
            pixels = batch[0]
            captured["batches"].append(float(pixels.double().sum()))  # which images this rank saw
            whole = hashlib.sha256("".join(state_hashes(task.model).values()).encode()).hexdigest()
            captured["steps"].append(whole)
            out = step_fn(fabric, model, batch, step)
            captured["buffer_dtypes"] = {k: str(b.dtype) for k, b in task.model.named_buffers()}  # inside the step
            return out

        task.training_step = training_step
        return real_fit(fabric, task, *a, **kw)

    if os.environ.get("RANK") == "0":
        print(f"{MARK}{name}", flush=True)
    stage1.fit = fit_and_capture
    try:
        stage1.run_stage1(cfg, RunFolder(run))
    finally:
        stage1.fit = real_fit

    fabric, model = captured["fabric"], captured["model"]
    return {"rank": fabric.global_rank, "world": fabric.world_size, "hashes": state_hashes(model),
            "steps": captured["steps"], "batches": captured["batches"], "env_rank": os.environ.get("RANK"),
            "torchelastic": dist.is_torchelastic_launched(), "buffer_dtypes": captured["buffer_dtypes"],
            "strategy": type(fabric.strategy).__name__}


def main() -> None:
    out = Path(sys.argv[1])
    mine = {name: run_and_record(name, run, overrides) for name, run, overrides in groups(sys.argv[2:])}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({name: [r[name] for r in everyone] for name in mine}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
