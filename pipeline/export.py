"""The exported sampler's file format: a folder with ``config.json`` (whatever rebuilds the modules, the sampling
defaults, the format version and the sha256 of the weights), ``model.safetensors`` (flat tensors; no pickle
anywhere) and a README. Reading checks the files, the format version and the sha256, and turns each failure into
one line; ``pipeline.sampler.Sampler`` builds itself from what is read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.io import UserError, atomic_write_bytes, atomic_write_text

FORMAT = "pipeline-sampler"
VERSION = 2  # 2: the whole VQ-VAE-2 (encoder too); 1 had the decoder only
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
REEXPORT = "export it again (Sampler.save_pretrained, which the sample stage runs)"


def write_export(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` (with the format, version and sha256 added) and ``tensors`` atomically into ``folder``."""
    from safetensors.torch import save

    folder = Path(folder)
    # tied weights share storage; safetensors wants each tensor on its own
    blob = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    config = {"format": FORMAT, "version": VERSION, **config, "sha256": {WEIGHTS: hashlib.sha256(blob).hexdigest()}}
    atomic_write_bytes(folder / WEIGHTS, blob)
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1))
    atomic_write_text(folder / "README.md", _README.format(folder=folder))
    return folder


def read_export(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the tensors of ``model.safetensors``, after checking the files, the format version and the
    sha256 of the weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    folder = Path(folder)
    cfg_path, weights_path = folder / CONFIG, folder / WEIGHTS
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise UserError(f"sampler folder {folder} has no {path.name}; {REEXPORT}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{cfg_path} is not valid JSON ({err}); {REEXPORT}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{cfg_path} is not a sampler config (no \"format\": \"{FORMAT}\"); {REEXPORT}")
    if config.get("version") != VERSION:
        raise UserError(f"{cfg_path} has format version {config.get('version')}, this package reads {VERSION}; "
                        f"{REEXPORT}")
    blob = weights_path.read_bytes()
    expected = config.get("sha256", {}).get(WEIGHTS)
    actual = hashlib.sha256(blob).hexdigest()
    if expected != actual:
        raise UserError(f"{weights_path} does not match the sha256 in config.json (expected {expected}, got "
                        f"{actual}): the file was changed or damaged; {REEXPORT}")
    try:
        return config, load(blob)
    except (SafetensorError, ValueError) as err:
        raise UserError(f"{weights_path} is not a readable safetensors file ({err})") from None


_README = """# Exported sampler

`config.json` (architecture, shapes, sampling defaults, sha256 of the weights) and `model.safetensors`
(the VQ-VAE-2, encoder, codebooks and decoder, and one autoregressive prior per level). No pickle.

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
