"""Fabric's FSDP strategy with full (consolidated) checkpoints, also on CPU processes (gloo).

Full state dicts make one checkpoint file that every stage loads, whatever the process count or strategy.

``make_fabric`` passes an auto-wrap policy with the prior blocks (``pipeline.priors.block_classes``): every block
is an FSDP unit of its own, so a rank keeps 1/world of the parameters and gathers one block at a time in forward
and backward, instead of the whole model (the root unit holds the rest: embeddings, head, conditioning network).
The VQ-VAE-2 has no such blocks and stays one unit.

Fabric 2.6 accepts FSDP on GPUs only, but torch's FSDP also runs on CPU over gloo, which is how this project
tests its FSDP path on machines without GPUs (on CPU it is slower than DDP and only meant for that). Two
things stand in the way, both handled here and only when the processes run on CPU:

* Fabric wraps the module with ``device_id=None``, and FSDP then looks for an accelerator and fails; the
  module is wrapped here with ``device_id=cpu`` first (Fabric keeps a module that is already wrapped).
* Fabric gathers full state dicts with ``offload_to_cpu=True``; for parameters that already live on the
  CPU, torch 2.13 then clones tensors whose storage was freed by the reshard, and the process segfaults.
  Saving and loading on CPU gather with ``offload_to_cpu=False`` instead (the tensors are on the CPU anyway).

Fabric's connector refuses ``type(strategy) is FSDPStrategy`` on CPU; a subclass instance passes.

Mixed precision: Fabric's FSDP precision casts parameters AND buffers to bf16/fp16. The EMA quantizer keeps
its codebook statistics in buffers, and an EMA with decay 0.99 cannot be updated in bf16 (8 bits of
mantissa lose most of each 1% step), so buffers stay in float32 here (``buffer_dtype``). Fabric's FSDP
autocast is hard-wired to CUDA; on CPU processes the same autocast runs for the CPU device.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from lightning_fabric.strategies import FSDPStrategy
from lightning_fabric.strategies import fsdp as fabric_fsdp

__all__ = ["FullStateFSDP", "local_parameter_bytes"]


def local_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters this process holds: all of them under DDP or one process; under FSDP (Fabric sets
    ``use_orig_params=True``) each parameter is a view of this rank's shard, so only the local part counts."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _full_state_dict_on_cpu(module, world_size: int, rank0_only: bool = True):
    """Fabric's ``_get_full_state_dict_context`` without the offload to CPU (see the module docstring)."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class FullStateFSDP(FSDPStrategy):
    """``FSDPStrategy`` with full state dicts by default (``state_dict_type="sharded"``: each rank saves its shard,
    see ``pipeline.checkpoint``) that also works when the processes run on CPU."""

    def __init__(self, state_dict_type: str = "full", **kwargs: Any) -> None:
        super().__init__(state_dict_type=state_dict_type, **kwargs)

    @property
    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    @property
    def mixed_precision_config(self):
        """Fabric's settings for the precision, with buffers kept in float32 (the quantizer's EMA statistics)."""
        config = super().mixed_precision_config
        if config is not None and config.buffer_dtype is not None and config.buffer_dtype != torch.float32:
            config = dataclasses.replace(config, buffer_dtype=torch.float32)
        return config

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        plugin = self.precision
        if self._on_cpu and "mixed" in plugin.precision:  # Fabric's forward_context autocasts for "cuda" only
            dtype = torch.bfloat16 if plugin.precision.startswith("bf16") else torch.float16
            plugin.forward_context = lambda: torch.autocast("cpu", dtype=dtype)
        if self._on_cpu and not any(isinstance(m, FSDP) for m in module.modules()):
            module = FSDP(module, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                          sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                          **self._fsdp_kwargs)
        if not any(isinstance(m, FSDP) for m in module.modules()):
            return super().setup_module(module)
        # Fabric deletes the auto-wrap policy (with a warning) when it meets a wrapped module; it is kept for the
        # next model of the run (stage 2 sets up one prior per level)
        kwargs = self._fsdp_kwargs
        self._fsdp_kwargs = {k: v for k, v in kwargs.items() if k != "auto_wrap_policy"}
        try:
            return super().setup_module(module)
        finally:
            self._fsdp_kwargs = kwargs

    @contextlib.contextmanager
    def _cpu_state_dicts(self) -> Iterator[None]:
        if not self._on_cpu:
            yield
            return
        original = fabric_fsdp._get_full_state_dict_context
        fabric_fsdp._get_full_state_dict_context = _full_state_dict_on_cpu
        try:
            yield
        finally:
            fabric_fsdp._get_full_state_dict_context = original

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        with self._cpu_state_dicts():
            return super().save_checkpoint(*args, **kwargs)

    def load_checkpoint(self, path: Any, state: Any = None, **kwargs: Any) -> Any:
        """Fabric's load; from a sharded checkpoint, objects with a state dict (the LR scheduler) get it loaded:
        Fabric 2.6 puts the saved state dict in their place in ``state`` instead, and the scheduler restarts."""
        from torch.optim import Optimizer

        stateful = {k: v for k, v in state.items() if hasattr(v, "load_state_dict")
                    and not isinstance(v, (torch.nn.Module, Optimizer))} if isinstance(state, dict) else {}
        with self._cpu_state_dicts():
            rest = super().load_checkpoint(path, state, **kwargs)
        for key, obj in stateful.items():
            if state[key] is not obj:
                obj.load_state_dict(state[key])
                state[key] = obj
        return rest
