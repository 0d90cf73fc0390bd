"""Lightning Fabric from the ``fabric`` config section, with every setting explicit, and the run's loggers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from pipeline.config import FabricConfig
from pipeline.io import UserError


def make_fabric(cfg: FabricConfig, loggers: list | None = None, launch: bool = True):
    """Fabric from the config, every setting explicit (a bare ``Fabric()`` under torchrun silently runs single
    processes). Under ``fabric run`` (env LT_CLI_USED) the launcher already started the processes."""
    from lightning_fabric import Fabric

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.accelerator in ("cuda", "gpu"):
        available = torch.cuda.device_count()
        if cfg.devices > available:
            raise UserError(f"fabric.devices={cfg.devices} but {available} CUDA device(s) exist; lower fabric.devices")
    elif cfg.accelerator == "cpu" and cfg.devices > (os.cpu_count() or 1) * 4:
        raise UserError(f"fabric.devices={cfg.devices} processes on {os.cpu_count()} CPU core(s); lower fabric.devices")
    if not os.environ.get("LT_CLI_USED") and torch.distributed.is_available() \
            and torch.distributed.is_torchelastic_launched():
        # torchrun started the processes: a Fabric that expects fewer would silently run each one alone
        world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if cfg.devices * cfg.num_nodes != world:
            raise UserError(f"torchrun started {world} process(es) ({local} per node) but fabric.devices="
                            f"{cfg.devices} x fabric.num_nodes={cfg.num_nodes} = {cfg.devices * cfg.num_nodes}; "
                            f"set fabric.devices={local} fabric.num_nodes={max(1, world // local)}")
    strategy = cfg.strategy
    if strategy == "auto" and (cfg.devices > 1 or cfg.num_nodes > 1):
        strategy = "ddp"
    if strategy == "fsdp":  # full state dicts by default: one checkpoint file that every stage can load
        from pipeline.fsdp import FullStateFSDP
        from pipeline.priors import block_classes

        blocks = block_classes()  # one FSDP unit per block: a rank holds its shards plus one gathered block
        strategy = FullStateFSDP(state_dict_type=cfg.fsdp_checkpoint, auto_wrap_policy=blocks,
                                 activation_checkpointing_policy=blocks if cfg.activation_checkpointing else None)
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy,
                    precision=cfg.precision, loggers=loggers or [])
    if launch and not os.environ.get("LT_CLI_USED"):
        fabric.launch()
    return fabric


def close_distributed(ok: bool = True) -> None:
    """End a multi-process run: wait for every rank (``ok``; after a failure the others may never arrive), then
    destroy the process group. A process that exits with it alive leaves Gloo's worker threads to the interpreter's
    teardown, which aborts some runs with "terminate called without an active exception" (SIGABRT)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def make_loggers(log_dir: Path) -> list:
    """CSV (``log_dir/logs/``) and TensorBoard (``log_dir/tensorboard/``, read by ``make tensorboard``) loggers."""
    from lightning_fabric.loggers import CSVLogger

    loggers: list = [CSVLogger(root_dir=str(log_dir), name="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        from lightning_fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=str(log_dir), name="tensorboard"))
    return loggers


def log_image(fabric, tag: str, image, step: int) -> None:
    """A PIL image to the TensorBoard loggers (the CSV logger keeps numbers only)."""
    import numpy as np
    from lightning_fabric.loggers import TensorBoardLogger

    for logger in fabric.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
