"""The self-contained sampler: the stage-1 decoder with its codebooks and one prior per level, generating
images by ancestral sampling (top codes from the top prior, each lower level given the level above, then the
decoder).

Exported as a folder with ``config.json`` (architecture, shapes, sampling defaults, sha256 of the weights) and
``model.safetensors`` (no pickle anywhere). ``Sampler.from_pretrained(folder)`` needs only this package:
no run folder, no YAML, no training code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import VQVAEConfig
from pipeline.io import UserError, atomic_write_bytes, atomic_write_text
from pipeline.priors import Prior, prior_from_spec
from pipeline.sampling import check_sampling_settings, image_uniforms, sample_level
from pipeline.vqvae import VQVAE2

FORMAT = "pipeline-sampler"
VERSION = 1
WEIGHTS = "model.safetensors"
LABEL_STREAM = 1_000  # the per-image random stream that draws uniform labels (levels use 0, 1, ...)


@dataclass
class Samples:
    images: np.ndarray  # (N, H, W, C) uint8
    codes: list[np.ndarray]  # per level, top first: (N, h, w)
    labels: np.ndarray  # (N,) int64, -1 for unconditional


def _decoder_keys(key: str) -> bool:
    """The VQ-VAE-2 weights decoding needs: codebooks, per-level upsamplers and the image decoder."""
    return key.startswith(("quantizers.", "upsamplers.", "decoder."))


class Sampler(nn.Module):
    def __init__(self, vqvae_cfg: VQVAEConfig, in_channels: int, image_size: int, priors: list[Prior],
                 level_names: list[str], prior_specs: list[dict], class_names: list[str] | None = None) -> None:
        super().__init__()
        self.vqvae = VQVAE2(vqvae_cfg, in_channels)
        self.priors = nn.ModuleList(priors)
        self.image_size, self.level_names, self.prior_specs = image_size, level_names, prior_specs
        self.class_names = class_names
        if len(priors) != vqvae_cfg.levels:
            raise ValueError(f"{len(priors)} priors for {vqvae_cfg.levels} levels")

    @property
    def num_classes(self) -> int:
        return self.priors[0].num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_models(cls, vqvae: VQVAE2, priors: list[Prior], image_size: int, level_names: list[str],
                    prior_specs: list[dict]) -> Sampler:
        sampler = cls(vqvae.cfg, vqvae.in_channels, image_size, priors, level_names, prior_specs)
        sampler.vqvae.load_state_dict(vqvae.state_dict())
        return sampler.eval()

    def config_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "vqvae": asdict(self.vqvae.cfg),
                "in_channels": self.vqvae.in_channels, "image_size": self.image_size, "levels": self.level_names,
                "priors": self.prior_specs, "class_names": self.class_names}

    def save_pretrained(self, folder: str | Path, sampling_defaults: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ a README) atomically into ``folder``."""
        from safetensors.torch import save

        folder = Path(folder)
        tensors = {f"vqvae.{k}": v for k, v in self.vqvae.state_dict().items() if _decoder_keys(k)}
        for name, prior in zip(self.level_names, self.priors):
            tensors.update({f"prior.{name}.{k}": v for k, v in prior.state_dict().items()})
        # tied weights share storage; safetensors wants each tensor on its own
        blob = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
        config = self.config_dict()
        config["sampling_defaults"] = sampling_defaults or {}
        config["sha256"] = {WEIGHTS: hashlib.sha256(blob).hexdigest()}
        atomic_write_bytes(folder / WEIGHTS, blob)
        atomic_write_text(folder / "config.json", json.dumps(config, indent=1))
        atomic_write_text(folder / "README.md", _README.format(folder=folder))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> Sampler:
        """Rebuild from an exported folder; a missing, corrupt or tampered file gives one clear error."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        folder = Path(folder)
        cfg_path, weights_path = folder / "config.json", folder / WEIGHTS
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise UserError(f"sampler folder {folder} has no {path.name}; export it again with `make sample`")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{cfg_path} is not valid JSON ({err}); export it again with `make sample`") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise UserError(f"{cfg_path} is not a sampler config (no \"format\": \"{FORMAT}\"); export it again")
        if config.get("version") != VERSION:
            raise UserError(f"{cfg_path} has format version {config.get('version')}, this package reads {VERSION}")
        blob = weights_path.read_bytes()
        expected = config.get("sha256", {}).get(WEIGHTS)
        actual = hashlib.sha256(blob).hexdigest()
        if expected != actual:
            raise UserError(f"{weights_path} does not match the sha256 in config.json (expected {expected}, got "
                            f"{actual}): the file was changed or damaged; export it again with `make sample`")
        try:
            tensors = load(blob)
        except (SafetensorError, ValueError) as err:
            raise UserError(f"{weights_path} is not a readable safetensors file ({err})") from None
        try:
            priors = [prior_from_spec(spec) for spec in config["priors"]]
            sampler = cls(VQVAEConfig(**config["vqvae"]), config["in_channels"], config["image_size"], priors,
                          config["levels"], config["priors"], config.get("class_names"))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{cfg_path} does not describe a sampler this package can build ({err})") from None
        vq_state = {k[len("vqvae."):]: v for k, v in tensors.items() if k.startswith("vqvae.")}
        missing = [k for k in sampler.vqvae.state_dict() if _decoder_keys(k) and k not in vq_state]
        if missing:
            raise UserError(f"{weights_path} lacks decoder weights ({missing[0]}, ...); export it again")
        sampler.vqvae.load_state_dict(vq_state, strict=False)
        for name, prior in zip(sampler.level_names, sampler.priors):
            prefix = f"prior.{name}."
            prior.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        sampler.sampling_defaults = config.get("sampling_defaults", {})
        return sampler.to(device).eval()

    # ------------------------------------------------------------------------------------------------------
    def resolve_labels(self, labels: Any, indices: list[int], seed: int) -> torch.Tensor | None:
        """Labels of the images ``indices``: None, "uniform", "none", an int, a list (cycled), or "3,5,7"."""
        c = self.num_classes
        if isinstance(labels, str):
            text = labels.strip().lower()
            if text in ("", "none"):
                labels = None
            elif text == "uniform":
                if c == 0:
                    return None
                return torch.tensor([int(np.random.default_rng([seed, LABEL_STREAM, i]).integers(c)) for i in indices])
            else:
                try:
                    labels = [int(x) for x in text.split(",")]
                except ValueError:
                    raise UserError(f"labels={labels!r}: expected uniform, none, a class index or a comma-separated "
                                    "list like 3,5,7") from None
        if labels is None:
            return None
        if c == 0:
            raise UserError("labels were given but this prior is unconditional (trained with "
                            "prior.class_conditional=false); leave labels out or use labels=none")
        values = [labels] if isinstance(labels, (int, np.integer)) else list(labels)
        bad = [v for v in values if not 0 <= int(v) < c]
        if bad or not values:
            raise UserError(f"label {bad[0] if bad else values} is outside the trained classes 0..{c - 1}")
        return torch.tensor([int(values[i % len(values)]) for i in indices])

    @torch.no_grad()
    def generate_samples(self, num: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         labels: Any = "uniform", guidance: float = 1.0, seed: int = 0, batch_size: int = 250,
                         start: int = 0, indices: list[int] | None = None, use_cache: bool = True,
                         progress: bool = False) -> Samples:
        """Images number ``start .. start + num - 1`` (or the given ``indices``) of the stream fixed by ``seed``.
        Image i depends only on (seed, i, settings): not on the batch size or on how images are split up."""
        try:
            check_sampling_settings(temperature, top_k, top_p, guidance)
        except ValueError as err:
            raise UserError(str(err)) from None
        if batch_size < 1 or num < 0:
            raise UserError(f"batch_size={batch_size}, num={num}: batch_size must be >= 1 and num >= 0")
        indices = list(range(start, start + num)) if indices is None else list(indices)
        all_labels = self.resolve_labels(labels, indices, seed)
        images, codes_out = [], [[] for _ in self.priors]
        from tqdm.auto import tqdm

        for b in tqdm(range(0, len(indices), batch_size), desc="sampling", disable=not progress, leave=False):
            idx = indices[b : b + batch_size]
            lab = None if all_labels is None else all_labels[b : b + batch_size].to(self.device)
            grids: list[torch.Tensor] = []
            for level, prior in enumerate(self.priors):
                u = image_uniforms(seed, level, idx, prior.seq_len)
                cond = grids[-1] if grids else None
                grids.append(sample_level(prior, u, lab, cond, temperature, top_k, top_p, guidance, use_cache))
            x = self.vqvae.decode_codes(grids)  # (B, C, H, W) in about [-1, 1]
            pixels = x.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
            images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())  # (B, H, W, C)
            for out, g in zip(codes_out, grids):
                out.append(g.cpu().numpy())
        c = self.vqvae.in_channels
        empty = np.zeros((0, self.image_size, self.image_size, c), np.uint8)
        return Samples(
            images=np.concatenate(images) if images else empty,
            codes=[np.concatenate(o) if o else np.zeros((0,), np.int64) for o in codes_out],
            labels=(all_labels.numpy() if all_labels is not None else np.full(len(indices), -1)).astype(np.int64),
        )

    def generate(self, num: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, labels: Any = "uniform",
                 guidance: float = 1.0, seed: int = 0, batch_size: int = 250) -> np.ndarray:
        """``num`` uint8 images (N, H, W, C)."""
        return self.generate_samples(num, temperature, top_k, top_p, labels, guidance, seed, batch_size).images


_README = """# Exported sampler

`config.json` (architecture, shapes, sampling defaults, sha256 of the weights) and `model.safetensors`
(the VQ-VAE-2 decoder with its codebooks, and one autoregressive prior per level). No pickle.

Load it with only the `pipeline` package installed:

```python
from pipeline import Sampler

sampler = Sampler.from_pretrained("{folder}")
images = sampler.generate(64, temperature=1.0, top_k=0, top_p=1.0, labels=7, guidance=1.0, seed=0)
# images: uint8 array (64, H, W, C)
```

or from the shell:

```
python -m pipeline.generate --sampler {folder} --num 64 --label 7 --out sevens.png
```
"""
