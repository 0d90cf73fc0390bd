"""The one training loop every stage shares, on Lightning Fabric.

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, a progress bar with rates,
CSV (and TensorBoard, when installed) logs, periodic held-out evaluation, atomic checkpoints (model,
optimizer, scheduler, step, RNG states, config) every ``checkpoint_every`` steps, automatic resume from
``last.ckpt``, a best checkpoint by the task's held-out metric, a NaN/Inf guard, and a checkpoint on Ctrl-C.

Data order is a seeded permutation per epoch, sharded across processes, addressed by step (data streamed from
files: a fixed shard per process, its position saved in the checkpoint): a resumed run sees exactly the batches
the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import shutil
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

from pipeline.card import hardware
from pipeline.checkpoint import (
    BEST_CKPT,
    LAST_CKPT,
    convert_sharded,
    optimizer_state_by_name,
    rank_rng_states,
    restore_rng,
    resume_point,
    rng_state,
    save_checkpoint,
    saved_state,
    saves_sharded,
    sharded_path,
)
from pipeline.config import TrainConfig
from pipeline.distributed import on_rank_zero
from pipeline.io import UserError


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


class ShardSampler(Sampler):
    """Batches of ``(index, epoch)`` pairs from this rank's own shard of ``n`` items, for data streamed from files:
    a permutation seeded by ``seed`` dealt to ``world`` ranks once (each rank reads only its own files; equal shares,
    so every rank takes as many steps), reshuffled every epoch by ``(seed, epoch, rank)``; partial batches dropped.
    The position (epoch, batches into it) moves on by :meth:`advance` as the loop takes batches, not as the loader
    prefetches them; a checkpoint keeps it with the seed (:meth:`state_dict`) and a resumed run continues there."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.per_epoch = (n // world) // batch_size
        if self.per_epoch < 1:
            raise UserError(f"batch_size={batch_size} x {world} process(es) is larger than the {n} training images; "
                            "lower the batch size")
        self.epoch = self.offset = 0
        self._deal(seed)

    def _deal(self, seed: int) -> None:
        self.seed = seed
        self.shard = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))[self.rank :: self.world]
        self.shard = self.shard[: self.n // self.world]  # (n // world,) item indices

    def order(self, epoch: int) -> list[int]:
        """This rank's items in the order of ``epoch``."""
        g = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank)
        return self.shard[torch.randperm(len(self.shard), generator=g)].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset, b = self.epoch, self.offset, self.batch_size
        while True:
            order = self.order(epoch)
            for k in range(offset, self.per_epoch):
                yield [(i, epoch) for i in order[k * b : (k + 1) * b]]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # infinite in principle; DataLoader wants a number
        return sys.maxsize

    def take(self, batch: Any) -> Any:
        """The loop took ``batch``: move the position on by one batch; the batch, for the step."""
        self.advance()
        return batch

    def advance(self) -> None:
        """One batch was taken."""
        self.epoch, self.offset = divmod(self.epoch * self.per_epoch + self.offset + 1, self.per_epoch)

    def seek(self, batches: int) -> None:
        """Go to the position after ``batches`` batches (a checkpoint that holds no position)."""
        self.epoch, self.offset = divmod(batches, self.per_epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "n": self.n, "world": self.world,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> str:
        """Continue at the saved position, in the saved seed's order. Returns "" when the resume is exact; when the
        item count, process count or batch size changed, the same share of the saved epoch is skipped instead and
        the returned note says so."""
        if state["seed"] != self.seed:
            self._deal(state["seed"])
        changed = [f"{k} {state[k]} -> {getattr(self, k)}" for k in ("n", "world", "batch_size")
                   if state[k] != getattr(self, k)]
        saved_per_epoch = max(1, (state["n"] // state["world"]) // state["batch_size"])
        self.epoch = state["epoch"]
        self.offset = state["offset"] * self.per_epoch // saved_per_epoch if changed else state["offset"]
        if not changed:
            return ""
        return (f"the data shards changed ({', '.join(changed)}): continuing at {self.offset}/{self.per_epoch} "
                f"batches of epoch {self.epoch}, in another order than an uninterrupted run")


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
    sharded: bool = False  # streamed data: fixed shards per rank (ShardSampler), the position saved in checkpoints
    # a ``train_set`` with ``for_rank`` (pipeline.hubstream.HubStream) is a stream with its own position instead


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


@dataclass
class _Loop:
    """What the phases of one ``fit`` share: the set-up objects, the checkpointed state and the rate meter."""

    fabric: Any
    task: Task
    tcfg: TrainConfig
    out_dir: Path
    desc: str
    model: Any
    optimizer: Any
    scheduler: Any
    param_names: dict[int, str]  # id(parameter) -> its name in the model, for optimizer state by name
    fsdp: bool
    state: dict[str, Any] = field(default_factory=dict)  # what a checkpoint holds: model, optimizer, step, ...
    units_done: int = 0  # images or tokens since the last log line
    t_rate: float = field(default_factory=time.perf_counter)
    skipped: int = 0  # steps skipped for a non-finite loss
    position: Any = None  # what knows where the data is, saved in checkpoints: a ShardSampler or a stream

    @property
    def last(self) -> Path:
        return self.out_dir / LAST_CKPT

    def save(self, path: Path) -> None:
        """A checkpoint of the state at this step boundary, with every rank's RNG and the training settings."""
        self.state["rng"] = rng_state()
        extra: dict[str, Any] = {"train": asdict(self.tcfg),  # the settings this checkpoint was trained with
                                 "hardware": hardware(self.fabric.device)}
        if self.fabric.world_size > 1:
            extra["rng_ranks"] = rank_rng_states(self.fabric)
        if getattr(self.position, "per_rank", False):  # a stream: every rank's own position
            mine, world = self.position.state_dict(), self.fabric.world_size
            extra["data"] = {"ranks": [self.fabric.broadcast(mine, src=r) for r in range(world)] if world > 1
                             else [mine]}
        elif self.position is not None:
            extra["data"] = self.position.state_dict()  # the same on every rank
        if not self.fsdp:  # FSDP's full optimizer state is already keyed by parameter name
            extra["optimizer"] = optimizer_state_by_name(self.optimizer, self.param_names)
        save_checkpoint(self.fabric, path, {**self.state, **extra})


def _set_up(fabric, task: Task, tcfg: TrainConfig, out_dir: Path, desc: str) -> _Loop:
    """Seeds, AdamW (no decay on biases and norms) with warmup + cosine, and the model and optimizer on Fabric."""
    from lightning_fabric.strategies import FSDPStrategy

    fabric.seed_everything(tcfg.seed + fabric.global_rank, verbose=False)
    model = task.model
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if saves_sharded(fabric) and any(not p.is_contiguous() for p in model.parameters()):
            raise UserError(f"{desc}: parameters in the channels_last memory format cannot be saved as sharded FSDP "
                            "checkpoints (torch's sharded tensors need contiguous ones); set channels_last=false in "
                            "this stage's section (e.g. stage1.channels_last=false) or fabric.fsdp_checkpoint=full")
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
    loop = _Loop(fabric, task, tcfg, Path(out_dir), desc, model, optimizer, scheduler, param_names, fsdp)
    loop.state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": 0, "best": float("inf"),
                  "rng": rng_state(), "meta": task.meta, "metrics": {}, "seconds": 0.0}
    return loop


def _resume(loop: _Loop, source: Path) -> tuple[dict, bool]:
    """Load ``source`` (``last.ckpt``, or its sharded form when that is newer) into the state; the config's optimizer
    and schedule settings win (and are reported). A sharded checkpoint is loaded shard by shard under FSDP (no rank
    reads the whole state) and converted to ``last.ckpt`` first otherwise. Returns (what the checkpoint holds besides
    the state: every rank's RNG states, the data position, ...; whether the run had already finished)."""
    fabric, tcfg, state = loop.fabric, loop.tcfg, loop.state
    if source.is_dir() and not loop.fsdp:
        on_rank_zero(fabric, lambda: convert_sharded(source, loop.last))
        source = loop.last
    saved = saved_state(source)  # a corrupt or unsafe file: one line, before Fabric's own loader sees it
    if "seconds" not in saved:  # written before training time was kept
        state.pop("seconds")
    rest = fabric.load(source, state, weights_only=True)  # what is not in ``state``: per-rank RNG, settings
    state.setdefault("seconds", 0.0)
    state["meta"] = loop.task.meta  # later checkpoints record this run's config (the changed settings)
    if state["step"] >= tcfg.max_steps:
        fabric.print(f"{loop.desc}: already finished ({state['step']}/{tcfg.max_steps} steps) in {loop.out_dir}; "
                     "use --fresh to start over, or raise max_steps to continue")
        return rest, True
    changed = apply_settings(loop.optimizer, loop.scheduler, tcfg, rest.get("train"))
    fabric.print(f"{loop.desc}: resuming from {source} at step {state['step']}"
                 + (f" with changed settings ({'; '.join(changed)}), applied from this step on" if changed else ""))
    return rest, False


def _batches(loop: _Loop, saved: dict) -> Iterator:
    """The training batches from the current step on, then the RNG restored. In memory, data order is addressed by
    step (StepSampler); streamed (``task.sharded``, or a stream's ``for_rank``), by the position the checkpoint
    ``saved``."""
    fabric, tcfg, task, step0 = loop.fabric, loop.tcfg, loop.task, loop.state["step"]
    rank, world = fabric.global_rank, fabric.world_size
    train_set, sampler = task.train_set, None
    if hasattr(train_set, "for_rank"):
        train_set = loop.position = train_set.for_rank(rank, world, tcfg.batch_size, tcfg.seed, task.num_workers)
    elif task.sharded:
        sampler = loop.position = ShardSampler(len(train_set), tcfg.batch_size, tcfg.seed, rank, world)
    else:
        sampler = StepSampler(len(train_set), tcfg.batch_size, tcfg.seed, rank, world, start=step0 * tcfg.grad_accum)
    if loop.position is not None:
        note = loop.position.load_state_dict(saved["data"]) if "data" in saved else \
            loop.position.seek(step0 * tcfg.grad_accum)
        if note:
            fabric.print(f"{loop.desc}: {note}")
    loader = DataLoader(train_set, batch_size=None if sampler is None else 1, batch_sampler=sampler,
                        collate_fn=_identity, num_workers=task.num_workers, persistent_workers=task.num_workers > 0,
                        pin_memory=fabric.device.type == "cuda")
    batches = _taken(iter(loader), loop.position)  # iter draws a seed from the global RNG: restore the state after
    if step0:
        restore_rng(fabric, saved.get("rng_ranks"), loop.state["rng"])
    return batches


def _taken(batches: Iterator, position: Any) -> Iterator:
    """``batches``, each handed to the data position (``take``) as the loop takes it, not as the loader prefetches."""
    for batch in batches:
        yield batch if position is None else position.take(batch)


def _micro_steps(loop: _Loop, model, batches: Iterator, stop: _StopOnInterrupt, step: int):
    """Forward and backward over ``grad_accum`` micro-batches. Returns (loss, logs, finite, stop agreed): one
    collective tells every rank whether any loss was not finite and whether any rank was asked to stop."""
    fabric, tcfg = loop.fabric, loop.tcfg
    logs: dict[str, float] = {}
    finite, stop_agreed = True, False
    for micro in range(tcfg.grad_accum):
        batch = fabric.to_device(next(batches))
        with fabric.no_backward_sync(loop.model, enabled=micro < tcfg.grad_accum - 1):
            loss, step_logs = loop.task.training_step(fabric, model, batch, step)
            flags = torch.stack([torch.isfinite(loss.detach()).logical_not(),
                                 torch.tensor(stop.requested, device=loss.device)]).float()
            flags = fabric.all_reduce(flags, reduce_op="max") if fabric.world_size > 1 else flags
            finite, stop_agreed = bool(flags[0] < 1), bool(flags[1] > 0)
            if not finite:
                break
            fabric.backward(loss / tcfg.grad_accum)
        loop.units_done += loop.task.count_units(batch)
        logs = {k: float(v) for k, v in step_logs.items()}
        logs["loss"] = float(loss.detach())
    return loss, logs, finite, stop_agreed


def _optimizer_step(loop: _Loop, loss: torch.Tensor, finite: bool, step: int) -> None:
    """Clip and step; after a non-finite loss, stop with one line (or skip the step with ``skip_nonfinite``)."""
    if not finite:
        loop.optimizer.zero_grad(set_to_none=True)
        if not loop.tcfg.skip_nonfinite:
            kept = (f"the last good checkpoint {loop.last} is kept" if loop.last.exists()
                    else f"no checkpoint was written to {loop.out_dir} yet")
            value = float(loss.detach())
            what = (f"loss is {value} (not finite)" if not math.isfinite(value)
                    else "the loss of another process is not finite")
            raise UserError(f"{loop.desc}: {what} at step {step}; stopped without saving, {kept}. Lower the learning "
                            "rate, try fabric.precision=32-true, or set skip_nonfinite=true to skip such batches")
        loop.skipped += 1  # the step still counts (data order and schedule are addressed by step)
    else:
        if loop.tcfg.grad_clip > 0:
            loop.fabric.clip_gradients(loop.model, loop.optimizer, max_norm=loop.tcfg.grad_clip)
        loop.optimizer.step()
        loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()


def _log(loop: _Loop, bar, logs: dict[str, float], step: int) -> None:
    """Every ``log_every`` steps: the training metrics with the rate and learning rate, to the loggers and bar."""
    if "loss" not in logs or not (step % loop.tcfg.log_every == 0 or step == loop.tcfg.max_steps):
        return
    task, fabric = loop.task, loop.fabric
    rate = loop.units_done * fabric.world_size / max(time.perf_counter() - loop.t_rate, 1e-9)
    logs.update({f"{task.units}_per_s": rate, "lr": loop.scheduler.get_last_lr()[0]})
    if loop.skipped:
        logs["skipped_nonfinite"] = loop.skipped
    fabric.log_dict({f"{task.log_prefix}train/{k}": v for k, v in logs.items()}, step=step)
    shown = {"loss": f"{logs['loss']:.4f}"}
    shown.update({k: f"{logs[k]:.3g}" for k in task.progress_keys if k in logs})
    shown[f"{task.units}/s"] = f"{rate:,.0f}"
    bar.set_postfix(shown, refresh=False)
    loop.units_done, loop.t_rate = 0, time.perf_counter()


def _validate(loop: _Loop, bar, step: int) -> None:
    """Every ``eval_every`` steps: held-out metrics, logged and shown; a new best is checkpointed."""
    task, fabric, state = loop.task, loop.fabric, loop.state
    if task.validate is None or not (step % loop.tcfg.eval_every == 0 or step == loop.tcfg.max_steps):
        return
    loop.model.eval()
    metrics = task.validate(fabric, loop.model, step)
    state["metrics"] = metrics
    fabric.log_dict({f"{task.log_prefix}val/{k}": v for k, v in metrics.items()}, step=step)
    if fabric.global_rank == 0:
        bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    value = metrics.get(task.best_metric)
    if task.best_metric and value is not None and value < state["best"]:
        state["best"] = value
        loop.save(loop.out_dir / BEST_CKPT)
    bar.unpause()  # the bar's rate and ETA count training steps, not this pause (the ETA read 1:23:27 after one)


def _single_files(loop: _Loop) -> None:
    """After training with sharded checkpoints: rank 0 converts ``last`` and ``best`` to the single files that
    every strategy and later stage loads (the sharded folders stay, to resume from under FSDP)."""
    if not saves_sharded(loop.fabric):
        return

    def convert() -> None:
        for path in (loop.last, loop.out_dir / BEST_CKPT):
            if resume_point(path) == sharded_path(path):  # newer than the file (or no file yet)
                convert_sharded(sharded_path(path), path)

    on_rank_zero(loop.fabric, convert)


def fit(fabric, task: Task, tcfg: TrainConfig, out_dir: Path, fresh: bool = False, desc: str = "train") -> dict:
    """Train ``task`` to ``tcfg.max_steps`` in ``out_dir`` (checkpoints ``last.ckpt`` and ``best.ckpt``), resuming
    from ``last.ckpt`` unless ``fresh``. Returns the final held-out metrics (empty if none)."""
    from tqdm.auto import tqdm

    loop = _set_up(fabric, task, tcfg, out_dir, desc)
    state, saved = loop.state, {}
    source = resume_point(loop.last, prefer_sharded=loop.fsdp)
    if fresh:  # an earlier run's sharded checkpoints must not pass for this run's later
        on_rank_zero(fabric, lambda: [shutil.rmtree(sharded_path(p), ignore_errors=True)
                                      for p in (loop.last, loop.out_dir / BEST_CKPT)])
    elif source is not None:
        saved, finished = _resume(loop, source)
        if finished:
            _single_files(loop)
            return dict(state["metrics"])
    model = torch.compile(loop.model) if tcfg.compile else loop.model
    batches = _batches(loop, saved)
    bar = tqdm(total=tcfg.max_steps, initial=state["step"], desc=desc, disable=fabric.global_rank != 0,
               dynamic_ncols=True, unit="step", file=sys.stderr)
    stop, saved_on_stop = _StopOnInterrupt(), False
    loop.t_rate = t_wall = time.perf_counter()
    try:
        stop.install()
        while state["step"] < tcfg.max_steps:
            step = state["step"]
            loop.model.train()
            loss, logs, finite, stop_agreed = _micro_steps(loop, model, batches, stop, step)
            _optimizer_step(loop, loss, finite, step)
            state["step"] = step = step + 1
            state["seconds"] += time.perf_counter() - t_wall  # training wall time, summed over resumed runs
            t_wall = time.perf_counter()
            bar.update(1)
            _log(loop, bar, logs, step)
            _validate(loop, bar, step)
            saved = step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps
            if saved:
                loop.save(loop.last)
            # Ctrl-C: stop at this step boundary (every rank agreed on it in the collective above)
            if step < tcfg.max_steps and (stop_agreed if fabric.world_size > 1 else stop.requested):
                if not saved:
                    loop.save(loop.last)
                bar.close()
                where = sharded_path(loop.last) if saves_sharded(fabric) else loop.last
                fabric.print(f"\n{desc}: interrupted; saved {where} at step {step}; run again to resume")
                saved_on_stop = True
                raise KeyboardInterrupt
        if task.validate is not None and task.best_metric and resume_point(loop.out_dir / BEST_CKPT) is None:
            loop.save(loop.out_dir / BEST_CKPT)  # e.g. a resumed run whose best was never written
        _single_files(loop)
    except KeyboardInterrupt:
        bar.close()
        if not saved_on_stop:  # a second Ctrl-C: the state may be mid-step, keep the last checkpoint
            kept = f"{loop.last} is kept" if loop.last.exists() else "nothing was saved"
            fabric.print(f"\n{desc}: interrupted at once; {kept}")
        raise
    finally:
        stop.restore()
        bar.close()
        for logger in fabric.loggers:
            logger.finalize("success")
    return dict(state["metrics"])
