"""Helper of tests/test_multiprocess.py, started by torchrun with 2 processes:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.mp_resume_helper DIR OUT.json KIND...

Each rank runs ``fit`` three times on a task whose loss draws from the global RNG on every rank (like class
dropout): straight to the end; stopped by Ctrl-C (SIGINT on every rank) in the middle; then resumed after
reseeding (what a fresh process would have). Rank 0 writes whether the resumed weights equal the straight
run's, bit for bit, and the step where the stop happened. KIND ``ddp``: under DDP, in DIR/ddp. KIND ``sharded``:
under FSDP with sharded checkpoints (the resume reads the shards; the compared files are the conversions written
when training ends), in DIR/sharded, and a fourth run is left stopped (DIR/sharded/interrupted) for the test to
resume in one process. Several kinds run one after the other in the same two processes (the first Fabric sets up
the process group, the next reuses it), and OUT.json holds ``{KIND: result}``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.checkpoint import sharded_meta, sharded_path
from pipeline.config import FabricConfig, TrainConfig
from pipeline.fabric import close_distributed, make_fabric
from pipeline.io import UserError, load_checkpoint
from pipeline.training import Task, fit


def task(ctrl_c_at: int = -1) -> Task:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g))

    def training_step(fabric, model, batch, step):
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        if step == ctrl_c_at:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs in between
        loss = (model(x) - y).pow(2).mean()
        return loss * (1 + torch.rand(())), {}  # a different random factor on every rank

    torch.manual_seed(0)
    return Task(model=nn.Linear(3, 1), train_set=data, training_step=training_step, count_units=len)


def train_config() -> TrainConfig:
    return TrainConfig(max_steps=8, batch_size=4, lr=1e-2, warmup_steps=0, checkpoint_every=100, eval_every=100,
                       log_every=100, channels_last=False, grad_clip=0)


def scenario(run: Path, kind: str) -> dict | None:
    """The runs of one KIND in ``run``; rank 0 returns what the test checks, the other ranks None."""
    sharded = kind == "sharded"
    fsdp = {"strategy": "fsdp", "fsdp_checkpoint": kind} if sharded else {}
    fabric = make_fabric(FabricConfig(devices=2, precision="32-true", threads=1, **fsdp))
    tcfg = train_config()
    fit(fabric, task(), tcfg, run / "straight")
    try:
        fit(fabric, task(ctrl_c_at=2), tcfg, run / "stopped")
    except KeyboardInterrupt:
        pass
    last = run / "stopped" / "last.ckpt"
    stopped_at = (sharded_meta(sharded_path(last)) if sharded else load_checkpoint(last))["step"]
    shards = sorted(f.name for f in sharded_path(last).glob("*")) if sharded else []
    stopped_file = last.exists()
    torch.manual_seed(1234 + fabric.global_rank)  # whatever a new process would start from
    fit(fabric, task(), tcfg, run / "stopped")
    channels_last = ""
    if sharded:
        try:
            fit(fabric, task(ctrl_c_at=2), tcfg, run / "interrupted")
        except KeyboardInterrupt:
            pass
        conv = Task(model=nn.Conv2d(2, 2, 3), train_set=task().train_set, training_step=task().training_step)
        try:
            fit(fabric, conv, replace(tcfg, channels_last=True), run / "conv", desc="conv")
        except UserError as err:
            channels_last = str(err)
    if fabric.global_rank != 0:
        return None
    a = load_checkpoint(run / "straight" / "last.ckpt")
    b = load_checkpoint(run / "stopped" / "last.ckpt")
    return {"stopped_at": stopped_at, "steps": [a["step"], b["step"]],
            "equal": all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]),
            "rng_ranks": list(b.get("rng_ranks", {}).get("torch", torch.empty(0)).shape),
            "shards": shards, "file_when_stopped": stopped_file, "model_keys": sorted(b["model"]),
            "optimizer_groups": [g["params"] for g in b["optimizer"]["param_groups"]], "channels_last": channels_last,
            "strategy": type(fabric.strategy).__name__}


def main() -> None:
    run, out, kinds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    results = {kind: scenario(run / kind, kind) for kind in kinds}
    if os.environ.get("RANK") == "0":
        out.write_text(json.dumps(results))
    close_distributed()


if __name__ == "__main__":
    main()
