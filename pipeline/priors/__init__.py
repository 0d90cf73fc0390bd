"""Autoregressive priors over code grids, behind one interface (:class:`pipeline.priors.base.Prior`)."""

from __future__ import annotations

from typing import Any

from pipeline.config import PriorNetConfig
from pipeline.priors.base import Prior


def build_prior(net: PriorNetConfig, grid: tuple[int, int], num_codes: int, num_classes: int,
                cond_grid: tuple[int, int] | None, cond_num_codes: int) -> Prior:
    """The prior network a config section asks for (``kind``: gpt or pixelcnn)."""
    shape = dict(grid=tuple(grid), num_codes=num_codes, num_classes=num_classes,
                 cond_grid=tuple(cond_grid) if cond_grid else None, cond_num_codes=cond_num_codes)
    if net.kind == "gpt":
        from pipeline.priors.gpt import GPTPrior

        return GPTPrior(**shape, arch=net.arch, n_layer=net.n_layer, n_embd=net.n_embd, n_head=net.n_head,
                        dropout=net.dropout)
    from pipeline.priors.pixelcnn import GatedPixelCNN

    return GatedPixelCNN(**shape, channels=net.channels, layers=net.layers, kernel_size=net.kernel_size,
                         cond_channels=net.cond_channels, cond_res_blocks=net.cond_res_blocks, dropout=net.dropout)


def prior_spec(net: PriorNetConfig, grid, num_codes: int, num_classes: int, cond_grid, cond_num_codes: int) -> dict:
    """Everything that rebuilds a prior, as plain values (stored in checkpoints and the exported sampler)."""
    from dataclasses import asdict

    return {"net": asdict(net), "grid": list(grid), "num_codes": num_codes, "num_classes": num_classes,
            "cond_grid": list(cond_grid) if cond_grid else None, "cond_num_codes": cond_num_codes}


def prior_from_spec(spec: dict[str, Any]) -> Prior:
    return build_prior(PriorNetConfig(**spec["net"]), spec["grid"], spec["num_codes"], spec["num_classes"],
                       spec["cond_grid"], spec["cond_num_codes"])


__all__ = ["Prior", "build_prior", "prior_from_spec", "prior_spec"]
