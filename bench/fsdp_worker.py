"""The parameter memory of one stage-2 prior per rank under DDP or FSDP, in processes started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m bench.fsdp_worker OUT.json ddp|fsdp [key=value]

The prior is the bottom prior of the default config (``key=value`` overrides, e.g. ``prior.bottom.n_layer=8``),
set up by Fabric as ``pipeline.training.fit`` does (``make_fabric``, AdamW, ``fabric.setup``), then trained for
one step so that the figures are those of a wrapping that trains. Rank 0 writes every rank's figures to OUT.json:
parameter bytes held after set-up (``pipeline.fsdp.local_parameter_bytes``), the whole model's, and the FSDP units
with their full (gathered) sizes: the largest one bounds what a rank gathers at once beyond its shards.
Used by ``make bench`` (the ``fsdp`` row) and by tests/test_multiprocess.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def fsdp_units(model: torch.nn.Module) -> list[int]:
    """The full (unsharded) parameter count of every FSDP unit of ``model`` (empty when it is not FSDP)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = []
    for unit in FSDP.fsdp_modules(model):
        flat = getattr(unit, "_flat_param", None)  # torch's FSDP keeps one flat parameter per unit
        if flat is not None:
            units.append(int(flat._unpadded_unsharded_size.numel()))
    return units


def main() -> None:
    out, strategy, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from pipeline.config import load_config
    from pipeline.fabric import make_fabric
    from pipeline.fsdp import local_parameter_bytes
    from pipeline.priors import build_prior
    from pipeline.vqvae import VQVAE2

    cfg = load_config(None, ["fabric.devices=2", f"fabric.strategy={strategy}", "fabric.precision=32-true",
                             "fabric.threads=1", *overrides])
    top, bottom = VQVAE2(cfg.vqvae).grid_shapes(cfg.data.image_size)[:2]
    k, classes = cfg.vqvae.codebook_size, 10
    torch.manual_seed(0)
    prior = build_prior(cfg.prior.bottom, bottom, k, classes, top, k)
    total = sum(p.numel() * p.element_size() for p in prior.parameters())
    fabric = make_fabric(cfg.fabric)
    model, optimizer = fabric.setup(prior, torch.optim.AdamW(prior.parameters(), lr=1e-3))
    local = local_parameter_bytes(model)
    batch = 4
    codes = torch.randint(0, k, (batch, *bottom))
    logits = model(codes, torch.randint(0, classes + 1, (batch,)), torch.randint(0, k, (batch, *top)))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, k), codes.reshape(-1))
    fabric.backward(loss)
    optimizer.step()
    mine = {"rank": fabric.global_rank, "strategy": strategy, "local_bytes": local, "model_bytes": total,
            "units": fsdp_units(model), "loss": float(loss.detach()), "kind": cfg.prior.bottom.kind,
            "checkpointed": sum(isinstance(m, CheckpointWrapper) for m in model.modules())}
    everyone: list = [None] * fabric.world_size
    dist.all_gather_object(everyone, mine)
    if fabric.global_rank == 0:
        out.write_text(json.dumps(everyone))
    fabric.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
