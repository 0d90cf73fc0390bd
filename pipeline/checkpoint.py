"""Checkpoints of the training loop: atomic saves that every rank joins, RNG states per rank for exact resume,
and optimizer state keyed by parameter name so a checkpoint moves between strategies and process counts. Loading
(``pipeline.io.load_checkpoint``) is safe: ``weights_only=True``, a one-line error for a damaged file.

Under FSDP with ``fabric.fsdp_checkpoint=sharded`` a checkpoint ``NAME.ckpt`` is written as the folder
``NAME.dcp/`` instead (torch.distributed.checkpoint: every rank writes its own shard, ``__{rank}_0.distcp``, and
rank 0 the rest of the state, ``meta.pt``): no rank gathers the whole model. ``convert_sharded`` turns it into the
single file every strategy and every later stage loads (``fit`` does so on rank 0 when training ends).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.distributed import on_rank_zero
from pipeline.io import UserError, as_os_error, atomic_torch_save

LAST_CKPT = "last.ckpt"  # the latest state, to resume from
BEST_CKPT = "best.ckpt"  # the state with the best held-out metric
SHARDED_META = "meta.pt"  # what a sharded checkpoint holds besides the model and optimizer (Fabric's name)


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


def saves_sharded(fabric) -> bool:
    """Whether ``fabric.save`` writes sharded checkpoints (FSDP with ``state_dict_type="sharded"``)."""
    from lightning_fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy) and fabric.strategy._state_dict_type == "sharded"


def sharded_path(path: Path) -> Path:
    """The sharded form of checkpoint ``path``: ``last.ckpt`` -> the folder ``last.dcp/``."""
    return Path(path).with_suffix(".dcp")


def sharded_meta(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint's state besides the model and optimizer (step, RNG, meta, ...), read safely."""
    from pipeline.io import load_checkpoint

    return load_checkpoint(Path(folder) / SHARDED_META)


def resume_point(path: Path, prefer_sharded: bool = False) -> Path | None:
    """Checkpoint ``path`` or its sharded form, whichever holds the later step (None when neither exists): a run
    saving sharded checkpoints converts them to ``path`` only when it ends, so after an interruption the sharded
    one is newer. At the same step the file wins, unless ``prefer_sharded`` (an FSDP run, which loads the shards)."""
    folder = sharded_path(path)
    if not (folder / SHARDED_META).is_file():
        return path if path.is_file() else None
    if not path.is_file():
        return folder
    sharded_step, file_step = sharded_meta(folder)["step"], saved_state(path)["step"]
    return folder if sharded_step > file_step or (prefer_sharded and sharded_step == file_step) else path


def saved_state(path: Path) -> dict[str, Any]:
    """What checkpoint ``path`` (a file, or a sharded folder) holds, for a look at its step, meta and settings
    before resuming: the tensors of a file are memory-mapped, not read, so every rank can afford it."""
    if Path(path).is_dir():
        return sharded_meta(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged or unsafe file: the full loader says so in one line
        from pipeline.io import load_checkpoint

        return load_checkpoint(path)


def convert_sharded(folder: Path, path: Path) -> Path:
    """The single-file checkpoint ``path`` from the sharded checkpoint ``folder``, in this one process (it holds
    the whole state once; run it on one rank): the model's full state dict under the plain parameter names and
    the optimizer state keyed by name, as FSDP's full checkpoints and every other strategy's."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    meta = sharded_meta(folder)
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)  # what torch's dcp_to_torch_save does, kept in memory to add the rest
    except Exception as err:  # noqa: BLE001 - a missing or damaged shard file
        raise UserError(f"sharded checkpoint {folder} cannot be read ({type(err).__name__}: {str(err)[:200]}); "
                        "delete it to resume from the last single-file checkpoint") from None
    return atomic_torch_save(path, {**meta, **state})


def save_checkpoint(fabric, path: Path, state: dict[str, Any]) -> None:
    """Atomic: every rank joins ``fabric.save`` to a temporary name, then rank 0 renames it (sharded: a folder,
    ``sharded_path(path)``, swapped in for the previous one)."""
    sharded = saves_sharded(fabric)
    if sharded:
        path = sharded_path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # a stale one from a killed run is simply overwritten
    if fabric.global_rank == 0:  # rank 0 writes the file (DDP, and FSDP with full state dicts)
        path.parent.mkdir(parents=True, exist_ok=True)  # FSDP's save does not create it
        if sharded and tmp.exists():
            shutil.rmtree(tmp)  # before the path broadcast of fabric.save that every rank waits for
    try:
        fabric.save(tmp, state)
    except BaseException as err:  # e.g. a full disk: remove the partial file, keep the last good checkpoint
        failed = as_os_error(err, path)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if failed is not err:
            raise failed from None
        raise

    def publish() -> None:  # rank 0 only
        for f in [tmp] if tmp.is_file() else sorted(tmp.iterdir()):  # on disk before the rename, so a crash of the
            with open(f, "rb+") as fh:  # machine cannot leave an empty file
                os.fsync(fh.fileno())
        if tmp.is_file():
            os.replace(tmp, path)
            return
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    on_rank_zero(fabric, publish)  # the other ranks wait for the rename, and stop too if it fails
