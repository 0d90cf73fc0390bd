"""The one training loop every stage shares, on Lightning Fabric.

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, a progress bar with rates,
CSV (and TensorBoard, when installed) logs, periodic held-out evaluation, atomic checkpoints (model,
optimizer, scheduler, step, RNG states, config) every ``checkpoint_every`` steps, automatic resume from
``last.ckpt``, a best checkpoint by the task's held-out metric, a NaN/Inf guard, and a checkpoint on Ctrl-C.

Data order is a seeded permutation per epoch, sharded across processes, addressed by step: a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import TrainConfig
from pipeline.distributed import on_rank_zero
from pipeline.io import UserError, as_os_error, load_checkpoint

LAST_CKPT = "last.ckpt"  # the latest state, to resume from
BEST_CKPT = "best.ckpt"  # the state with the best held-out metric


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepSampler(Sampler):
    """Batches of indices for micro-batch ``start``, ``start + 1``, ...: epoch ``e`` is a permutation seeded by
    ``(seed, e)``, split across ``world`` ranks (rank r takes every world-th index); partial batches dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start = n, batch_size, seed, rank, world, start
        self.per_epoch = (n // world) // batch_size
        if self.per_epoch < 1:
            raise UserError(f"batch_size={batch_size} x {world} process(es) is larger than the {n} training images; "
                            "lower the batch size")

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.start
        while True:
            epoch, offset = divmod(micro, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g)[self.rank :: self.world]
            for b in range(offset, self.per_epoch):
                yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            micro = (epoch + 1) * self.per_epoch

    def __len__(self) -> int:  # infinite in principle; DataLoader wants a number
        return sys.maxsize


def _identity(batch: Any) -> Any:
    return batch


@dataclass
class Task:
    """What a stage gives the loop."""

    model: nn.Module
    train_set: Dataset
    # (fabric, model, batch, step) -> (loss, metrics to log); metrics are floats or scalar tensors
    training_step: Callable[..., tuple[torch.Tensor, dict[str, Any]]]
    # (fabric, model, step) -> held-out metrics (rank 0 may write images); None = no evaluation
    validate: Callable[..., dict[str, float]] | None = None
    best_metric: str = ""  # a key of validate's dict, lower is better; "" = no best.ckpt
    units: str = "img"  # what the rate counts
    count_units: Callable[[Any], int] = lambda batch: len(batch[0])
    progress_keys: tuple[str, ...] = ()  # metrics shown in the progress bar besides the loss
    meta: dict[str, Any] = field(default_factory=dict)  # saved in every checkpoint (config, shapes, ...)
    log_prefix: str = ""  # e.g. "top/" when several models log into one folder
    num_workers: int = 0  # DataLoader worker processes


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rank_rng_states(fabric) -> dict[str, torch.Tensor] | None:
    """Every rank's RNG state as (world, n) uint8 tensors, for a checkpoint (None with one process): ranks draw
    different random numbers (e.g. class dropout), so a resume with the same world size restores each."""
    if fabric.world_size == 1:
        return None
    states = {"torch": fabric.all_gather(fabric.to_device(torch.get_rng_state())).cpu()}  # (world, n)
    if fabric.device.type == "cuda":
        states["cuda"] = fabric.all_gather(fabric.to_device(torch.cuda.get_rng_state(fabric.device))).cpu()
    return states


def _restore_rng(fabric, rank_states: dict[str, torch.Tensor] | None, rank0_state: dict[str, Any]) -> None:
    """Each rank's own saved RNG state when the checkpoint has them for this world size; else rank 0 takes the
    saved (rank 0's) state and the other ranks keep their fresh seeds."""
    rank = fabric.global_rank
    if rank_states is not None and len(rank_states["torch"]) == fabric.world_size:
        torch.set_rng_state(rank_states["torch"][rank].clone())
        if "cuda" in rank_states and fabric.device.type == "cuda":
            torch.cuda.set_rng_state(rank_states["cuda"][rank].clone(), fabric.device)
    elif rank == 0:
        _set_rng_state(rank0_state)


def _set_rng_state(state: dict[str, Any]) -> None:
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


class _StopOnInterrupt:
    """Ctrl-C (SIGINT) during training asks to stop: the current step finishes, a checkpoint is saved at that
    step boundary (never a half-applied step), then KeyboardInterrupt is raised. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested, self._previous = False, None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def apply_settings(optimizer, scheduler, tcfg: TrainConfig, saved: dict[str, Any] | None) -> list[str]:
    """On resume, the config's optimizer and schedule settings win over the checkpoint's (so ``config.yaml``
    records what runs): the learning rate and weight decay are set again; warmup, decay and clipping are read
    from ``tcfg`` at every step anyway. Returns the changed settings as ``key: old -> new`` (empty without a
    record in the checkpoint)."""
    optimizer.param_groups[0]["weight_decay"] = tcfg.weight_decay  # fit's first group; biases and norms keep 0
    scheduler.base_lrs = [tcfg.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = tcfg.lr
        group["lr"] = tcfg.lr * warmup_cosine(scheduler.last_epoch, tcfg.warmup_steps, tcfg.max_steps,
                                              tcfg.min_lr_ratio)
    now = asdict(tcfg)
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if saved is not None and k in saved and saved[k] != now[k]]


def _check_loadable(path: Path) -> None:
    load_checkpoint(path)  # raises a one-line UserError for a corrupt or unsafe file


def fit(fabric, task: Task, tcfg: TrainConfig, out_dir: Path, fresh: bool = False, desc: str = "train") -> dict:
    """Train ``task`` to ``tcfg.max_steps`` in ``out_dir`` (checkpoints ``last.ckpt`` and ``best.ckpt``).
    Returns the final held-out metrics (empty if none)."""
    from lightning_fabric.strategies import FSDPStrategy
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    last = out_dir / LAST_CKPT
    fabric.seed_everything(tcfg.seed + fabric.global_rank, verbose=False)
    model = task.model
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg.lr, betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, tcfg.warmup_steps, tcfg.max_steps, tcfg.min_lr_ratio)
    )
    param_names = {id(p): name for name, p in model.named_parameters()}
    fsdp = isinstance(fabric.strategy, FSDPStrategy)
    model, optimizer = fabric.setup(model, optimizer)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0,
                             "best": float("inf"), "rng": _rng_state(), "meta": task.meta, "metrics": {}}
    rank_rng = None
    if last.exists() and not fresh:
        _check_loadable(last)
        rest = fabric.load(last, state, weights_only=True)  # what is not in ``state``: per-rank RNG, settings
        rank_rng = rest.get("rng_ranks")
        if state["step"] >= tcfg.max_steps:
            fabric.print(f"{desc}: already finished ({state['step']}/{tcfg.max_steps} steps) in {out_dir}; "
                         "use --fresh to start over, or raise max_steps to continue")
            return dict(state["metrics"])
        changed = apply_settings(optimizer, scheduler, tcfg, rest.get("train"))
        fabric.print(f"{desc}: resuming from {last} at step {state['step']}"
                     + (f" with changed settings ({'; '.join(changed)}), applied from this step on" if changed else ""))
    step0 = state["step"]
    train_model = torch.compile(model) if tcfg.compile else model

    sampler = StepSampler(len(task.train_set), tcfg.batch_size, tcfg.seed, fabric.global_rank, fabric.world_size,
                          start=step0 * tcfg.grad_accum)
    loader = DataLoader(task.train_set, batch_sampler=sampler, collate_fn=_identity,
                        num_workers=task.num_workers, persistent_workers=task.num_workers > 0)
    batches = iter(loader)  # draws a seed from the global RNG: restore the saved state after it
    if step0:
        _restore_rng(fabric, rank_rng, state["rng"])

    def checkpoint(path: Path) -> None:
        state["rng"] = _rng_state()
        extra: dict[str, Any] = {}
        if fabric.world_size > 1:
            extra["rng_ranks"] = _rank_rng_states(fabric)
        if not fsdp:  # FSDP's full optimizer state is already keyed by parameter name
            extra["optimizer"] = optimizer_state_by_name(optimizer, param_names)
        extra["train"] = asdict(tcfg)  # the settings this checkpoint was trained with
        save_checkpoint(fabric, path, {**state, **extra})

    bar = tqdm(total=tcfg.max_steps, initial=step0, desc=desc, disable=fabric.global_rank != 0, dynamic_ncols=True,
               unit="step", file=sys.stderr)
    units_done, t_rate = 0, time.perf_counter()
    metrics: dict[str, float] = dict(state["metrics"])
    skipped = 0
    stop, saved_on_stop = _StopOnInterrupt(), False
    try:
        stop.install()
        while state["step"] < tcfg.max_steps:
            step = state["step"]
            model.train()
            logs: dict[str, float] = {}
            for micro in range(tcfg.grad_accum):
                batch = fabric.to_device(next(batches))
                with fabric.no_backward_sync(model, enabled=micro < tcfg.grad_accum - 1):
                    loss, step_logs = task.training_step(fabric, train_model, batch, step)
                    # one collective for both: any rank with a non-finite loss, any rank asked to stop
                    flags = torch.stack([torch.isfinite(loss.detach()).logical_not(),
                                         torch.tensor(stop.requested, device=loss.device)]).float()
                    flags = fabric.all_reduce(flags, reduce_op="max") if fabric.world_size > 1 else flags
                    finite, stop_agreed = 1 - flags[0], bool(flags[1] > 0)
                    if finite.item() < 1:
                        break
                    fabric.backward(loss / tcfg.grad_accum)
                units_done += task.count_units(batch)
                logs = {k: float(v) for k, v in step_logs.items()}
                logs["loss"] = float(loss.detach())
            if finite.item() < 1:
                optimizer.zero_grad(set_to_none=True)
                if not tcfg.skip_nonfinite:
                    kept = (f"the last good checkpoint {last} is kept" if last.exists()
                            else f"no checkpoint was written to {out_dir} yet")
                    value = float(loss.detach())
                    what = (f"loss is {value} (not finite)" if not math.isfinite(value)
                            else "the loss of another process is not finite")
                    raise UserError(
                        f"{desc}: {what} at step {step}; stopped without saving, {kept}. Lower the learning rate, "
                        "try fabric.precision=32-true, or set skip_nonfinite=true to skip such batches"
                    )
                skipped += 1  # the step still counts (data order and schedule are addressed by step)
            else:
                if tcfg.grad_clip > 0:
                    fabric.clip_gradients(model, optimizer, max_norm=tcfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] = step = step + 1
            bar.update(1)
            if "loss" in logs and (step % tcfg.log_every == 0 or step == tcfg.max_steps):
                elapsed = time.perf_counter() - t_rate
                rate = units_done * fabric.world_size / max(elapsed, 1e-9)
                logs.update({f"{task.units}_per_s": rate, "lr": scheduler.get_last_lr()[0]})
                if skipped:
                    logs["skipped_nonfinite"] = skipped
                fabric.log_dict({f"{task.log_prefix}train/{k}": v for k, v in logs.items()}, step=step)
                shown = {"loss": f"{logs['loss']:.4f}"}
                shown.update({k: f"{logs[k]:.3g}" for k in task.progress_keys if k in logs})
                shown[f"{task.units}/s"] = f"{rate:,.0f}"
                bar.set_postfix(shown, refresh=False)
                units_done, t_rate = 0, time.perf_counter()
            if task.validate is not None and (step % tcfg.eval_every == 0 or step == tcfg.max_steps):
                model.eval()
                metrics = task.validate(fabric, model, step)
                state["metrics"] = metrics
                fabric.log_dict({f"{task.log_prefix}val/{k}": v for k, v in metrics.items()}, step=step)
                shown_val = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                bar.write(f"step {step}: {shown_val}") if fabric.global_rank == 0 else None
                value = metrics.get(task.best_metric)
                if task.best_metric and value is not None and value < state["best"]:
                    state["best"] = value
                    checkpoint(out_dir / BEST_CKPT)
            saved = step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps
            if saved:
                checkpoint(last)
            # Ctrl-C: stop at this step boundary (every rank agreed on it in the collective above)
            if step < tcfg.max_steps and (stop_agreed if fabric.world_size > 1 else stop.requested):
                if not saved:
                    checkpoint(last)
                bar.close()
                fabric.print(f"\n{desc}: interrupted; saved {last} at step {step}; run again to resume")
                saved_on_stop = True
                raise KeyboardInterrupt
        if task.validate is not None and task.best_metric and not (out_dir / BEST_CKPT).exists():
            checkpoint(out_dir / BEST_CKPT)  # e.g. a resumed run whose best was never written
    except KeyboardInterrupt:
        bar.close()
        if not saved_on_stop:  # a second Ctrl-C: the state may be mid-step, keep the last checkpoint
            kept = f"{last} is kept" if last.exists() else "nothing was saved"
            fabric.print(f"\n{desc}: interrupted at once; {kept}")
        raise
    finally:
        stop.restore()
        bar.close()
        for logger in fabric.loggers:
            logger.finalize("success")
    return metrics
