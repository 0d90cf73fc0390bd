"""Checkpoints of the training loop: atomic saves that every rank joins, RNG states per rank for exact resume,
and optimizer state keyed by parameter name so a checkpoint moves between strategies and process counts. Loading
(``pipeline.io.load_checkpoint``) is safe: ``weights_only=True``, a one-line error for a damaged file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import on_rank_zero
from pipeline.io import as_os_error

LAST_CKPT = "last.ckpt"  # the latest state, to resume from
BEST_CKPT = "best.ckpt"  # the state with the best held-out metric


def rng_state() -> dict[str, Any]:
    """This process's RNG state (torch, and CUDA where there is one), for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rank_rng_states(fabric) -> dict[str, torch.Tensor] | None:
    """Every rank's RNG state as (world, n) uint8 tensors, for a checkpoint (None with one process): ranks draw
    different random numbers (e.g. class dropout), so a resume with the same world size restores each."""
    if fabric.world_size == 1:
        return None
    states = {"torch": fabric.all_gather(fabric.to_device(torch.get_rng_state())).cpu()}  # (world, n)
    if fabric.device.type == "cuda":
        states["cuda"] = fabric.all_gather(fabric.to_device(torch.cuda.get_rng_state(fabric.device))).cpu()
    return states


def restore_rng(fabric, rank_states: dict[str, torch.Tensor] | None, rank0_state: dict[str, Any]) -> None:
    """Each rank's own saved RNG state when the checkpoint has them for this world size; else rank 0 takes the
    saved (rank 0's) state and the other ranks keep their fresh seeds."""
    rank = fabric.global_rank
    if rank_states is not None and len(rank_states["torch"]) == fabric.world_size:
        torch.set_rng_state(rank_states["torch"][rank].clone())
        if "cuda" in rank_states and fabric.device.type == "cuda":
            torch.cuda.set_rng_state(rank_states["cuda"][rank].clone(), fabric.device)
    elif rank == 0:
        set_rng_state(rank0_state)


def set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with each parameter named by its path in the model (``names``: id(param) ->
    name) instead of numbered: the form FSDP saves with full state dicts, so a checkpoint moves between
    strategies and process counts. ``Optimizer.load_state_dict`` matches saved parameters by position, whatever
    their ids, so both forms load in a non-FSDP run."""
    sd = optimizer.state_dict()
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    numbers = [i for group in sd["param_groups"] for i in group["params"]]
    rename = dict(zip(numbers, ordered, strict=True))
    return {"state": {rename[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [rename[i] for i in g["params"]]} for g in sd["param_groups"]]}


def save_checkpoint(fabric, path: Path, state: dict[str, Any]) -> None:
    """Atomic: every rank joins ``fabric.save`` to a temporary name, then rank 0 renames it."""
    tmp = path.with_name(f".{path.name}.tmp")  # a stale one from a killed run is simply overwritten
    if fabric.global_rank == 0:  # rank 0 writes the file (DDP, and FSDP with full state dicts)
        path.parent.mkdir(parents=True, exist_ok=True)  # FSDP's save does not create it
    try:
        fabric.save(tmp, state)
    except BaseException as err:  # e.g. a full disk: remove the partial file, keep the last good checkpoint
        failed = as_os_error(err, path)
        tmp.unlink(missing_ok=True)
        if failed is not err:
            raise failed from None
        raise

    def publish() -> None:  # rank 0 only
        if tmp.is_file():  # on disk before the rename, so a crash of the machine cannot leave an empty file
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)

    on_rank_zero(fabric, publish)  # the other ranks wait for the rename, and stop too if it fails
