"""Autoregressive priors over code grids, behind one interface (:class:`pipeline.priors.base.Prior`), and the
spec that rebuilds one: its network's config (only the fields its kind uses) and the shapes of its grids."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from torch import nn

from pipeline.config import PriorNetConfig, prior_net_from_dict
from pipeline.priors.base import Decoding, Prior


def build_prior(net: PriorNetConfig, grid: tuple[int, int], num_codes: int, num_classes: int,
                cond_grid: tuple[int, int] | None, cond_num_codes: int, cond_window: int = 0) -> Prior:
    """The prior network a config section asks for (``kind``: gpt or pixelcnn); ``cond_window`` (GPT only, see
    ``PriorConfig.window_for``) limits the upper codes each code is conditioned on."""
    shape = dict(grid=tuple(grid), num_codes=num_codes, num_classes=num_classes,
                 cond_grid=tuple(cond_grid) if cond_grid else None, cond_num_codes=cond_num_codes)
    settings = {k: v for k, v in asdict(net).items() if k != "kind"}  # the config class lists the model's keywords
    if net.kind == "gpt":
        from pipeline.priors.gpt import GPTPrior

        return GPTPrior(**shape, **settings, cond_window=cond_window)
    if cond_window:
        raise ValueError(f"cond_window={cond_window}: only GPT priors take a conditioning window")
    from pipeline.priors.pixelcnn import GatedPixelCNN

    return GatedPixelCNN(**shape, **settings)


def block_classes() -> set[type[nn.Module]]:
    """The repeated blocks of every prior kind (GPT-2's and Llama's decoder layers, the PixelCNN's gated layers):
    FSDP shards each as its own unit, so a rank holds one block's full weights at a time (not the whole model's),
    and activation checkpointing recomputes each block's activations in the backward pass."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from pipeline.priors.pixelcnn import _GatedLayer

    return {GPT2Block, LlamaDecoderLayer, _GatedLayer}


def prior_spec(net: PriorNetConfig, grid, num_codes: int, num_classes: int, cond_grid, cond_num_codes: int,
               cond_window: int = 0) -> dict:
    """Everything that rebuilds a prior, as plain values (stored in checkpoints and the exported sampler)."""
    return {"net": asdict(net), "grid": list(grid), "num_codes": num_codes, "num_classes": num_classes,
            "cond_grid": list(cond_grid) if cond_grid else None, "cond_num_codes": cond_num_codes,
            "cond_window": cond_window}


def normalize_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec with only the fields its kind uses: specs written before the per-kind configs carried every field of
    both kinds, which are dropped here, and specs written before conditioning windows have none (0), so old
    checkpoints resume and load like new ones."""
    net = spec["net"]
    kind = net.get("kind", "gpt")
    own = prior_net_from_dict({"kind": kind})
    values = {k: v for k, v in net.items() if hasattr(own, k)}
    return {"cond_window": 0, **spec, "net": asdict(prior_net_from_dict(values))}


def prior_from_spec(spec: dict[str, Any]) -> Prior:
    spec = normalize_spec(spec)
    return build_prior(prior_net_from_dict(spec["net"]), spec["grid"], spec["num_codes"], spec["num_classes"],
                       spec["cond_grid"], spec["cond_num_codes"], spec["cond_window"])


__all__ = ["Decoding", "Prior", "block_classes", "build_prior", "normalize_spec", "prior_from_spec", "prior_spec"]
