"""Collecting per-rank results in multi-process runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.io import UserError

# stands in for Fabric where code that can run on several ranks runs in a plain single process (no collectives)
ONE_PROCESS = SimpleNamespace(global_rank=0, world_size=1)


def shard_indices(num: int, rank: int, world: int) -> list[int]:
    """The items of rank ``rank``: every world-th index, starting at the rank."""
    return list(range(rank, num, world))


def shard_batches(num: int, rank: int, world: int, batch_size: int) -> Iterator[tuple[list[int], bool]]:
    """The rank's items (``shard_indices``) in batches, as ``(indices, real)``, with the same number of batches on
    every rank: under FSDP every forward pass is a collective, so all ranks must call the model equally often.
    A rank that runs out early gets ``([0], False)`` batches: run the model on them and discard the result."""
    mine = shard_indices(num, rank, world)
    most = len(shard_indices(num, 0, world))  # rank 0 holds the most items
    for start in range(0, most, batch_size):
        chunk = mine[start : start + batch_size]
        yield (chunk, True) if chunk else ([0], False)


def gather_rows(fabric, arrays: list[np.ndarray], num: int) -> list[np.ndarray] | None:
    """Each rank holds rows ``shard_indices(num, rank, world)`` of every array; rank 0 gets the full arrays in
    index order (other ranks get None). One process: returned unchanged."""
    world, rank = fabric.world_size, fabric.global_rank
    if world == 1:
        return arrays
    per = -(-num // world)
    counts = [len(shard_indices(num, r, world)) for r in range(world)]
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        pad = per - len(t)
        if pad:
            t = torch.cat([t, t.new_zeros((pad,) + t.shape[1:])])
        g = fabric.all_gather(fabric.to_device(t)).cpu().numpy()  # (world, per, ...)
        full = np.empty((num,) + g.shape[2:], dtype=g.dtype)
        for r in range(world):
            full[r::world] = g[r, : counts[r]]
        out.append(full)
    return out if rank == 0 else None


def on_rank_zero(fabric, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (others get None), with its failure shared: if ``fn`` raises on rank 0, every
    other rank raises a UserError that says so, instead of waiting for rank 0 at the next collective (a
    timeout, or a gloo/NCCL traceback that hides the cause). Rank 0 re-raises its own exception unchanged."""
    if fabric.world_size == 1:
        return fn()
    result, message, failure = None, None, None
    if fabric.global_rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised as is
            failure = err
            message = str(err) if isinstance(err, UserError) else f"rank 0 failed: {type(err).__name__}: {err}"
    message = fabric.broadcast(message, src=0)
    if failure is not None:
        raise failure
    if message is not None:
        raise UserError(message)
    return result


def rank_zero_first(fabric, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 first (it may write a file, e.g. a cache), then on the other ranks (which can read it).
    A failure on rank 0 is raised on every rank (see ``on_rank_zero``)."""
    result = on_rank_zero(fabric, fn)
    return result if fabric.global_rank == 0 else fn()


def rank_zero_result(fabric, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only, its (picklable) result sent to every rank; a failure is shared as in
    ``on_rank_zero``. For a decision all ranks must agree on, e.g. whether an earlier extraction is reusable."""
    result = on_rank_zero(fabric, fn)
    return result if fabric.world_size == 1 else fabric.broadcast(result, src=0)


def on_every_rank(fabric, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, returning once every rank has finished it (it ends with a collective). If it raises
    anywhere, every rank raises: the failed rank its own exception unchanged, the others a one-line UserError with
    the first failed rank's reason, instead of waiting for it at the next collective."""
    if fabric.world_size == 1:
        return fn()
    result, message, failure = None, None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised as is
        failure = err
        message = str(err) if isinstance(err, UserError) else \
            f"rank {fabric.global_rank} failed: {type(err).__name__}: {err}"
    failed = fabric.all_gather(fabric.to_device(torch.tensor([failure is not None]))).reshape(-1).cpu()
    if failed.any():
        message = fabric.broadcast(message, src=int(failed.nonzero()[0, 0]))
        if failure is not None:
            raise failure
        raise UserError(message)
    return result
