"""The exported sampler's file format: a folder with ``config.json`` (whatever rebuilds the modules, the sampling
defaults, the model card's facts, the format version and the sha256 of the weights), ``model.safetensors`` (flat
tensors; no pickle anywhere), ``samples.png`` and the model card ``README.md`` (``pipeline.card``). Reading checks
the files, the format version and the sha256, and turns each failure into one line; a Hub repo id is downloaded
first (``locate``); ``pipeline.sampler.Sampler`` builds itself from what is read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pipeline import card
from pipeline.io import UserError, atomic_write_bytes, atomic_write_text

FORMAT = "pipeline-sampler"
VERSION = 2  # 2: the whole VQ-VAE-2 (encoder too); 1 had the decoder only
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
REEXPORT = "export it again (Sampler.save_pretrained, which the sample stage runs)"


def write_export(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], grid=None) -> Path:
    """Write ``config`` (with the format, version and sha256 added), ``tensors``, the sample ``grid`` (a PIL image)
    and the model card into ``folder``, each file atomically; the weights first, the config that vouches for them
    after."""
    from safetensors.torch import save

    from pipeline.io import atomic_save_png

    folder = Path(folder)
    # tied weights share storage; safetensors wants each tensor on its own
    blob = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    config = {"format": FORMAT, "version": VERSION, **config, "sha256": {WEIGHTS: hashlib.sha256(blob).hexdigest()}}
    atomic_write_bytes(folder / WEIGHTS, blob)
    if grid is not None:
        atomic_save_png(folder / card.GRID, grid)
    write_config(folder, config)
    return folder


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """``config.json`` and the model card rendered from it."""
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=1))
    atomic_write_text(folder / CARD, card.render(config))


def record_evaluation(folder: str | Path, report: dict[str, Any]) -> None:
    """Put an evaluation report into the model card of the exported sampler in ``folder`` (config.json's
    ``card.evaluation``, then README.md again); the weights and their sha256 are untouched."""
    path = Path(folder) / CONFIG
    config = json.loads(path.read_text())
    config.setdefault("card", {})["evaluation"] = report
    write_config(Path(folder), config)


def locate(name: str | Path, **hub: Any) -> Path:
    """The local folder of a sampler: ``name`` itself when it exists here, else a Hub repo id ("user/model") whose
    files are downloaded into the Hub cache (``hub``: revision, cache_dir, force_download, local_files_only, token;
    ``huggingface_hub.snapshot_download``'s arguments)."""
    folder = Path(name)
    if folder.exists() or str(name).count("/") != 1 or str(name).startswith((".", "/", "~")):
        return folder  # a local path (missing files are reported by read_export)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id=str(name), allow_patterns=[CONFIG, WEIGHTS, CARD, card.GRID], **hub))
    except HFValidationError as err:
        raise UserError(f"{name!r} is neither a folder here nor a Hub repo id ({err})") from None
    except Exception as err:  # network, authentication, missing repo: the library's many error types
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"cannot download the sampler {name!r} from the Hugging Face Hub ({reason}); check the repo "
                        "id, your network and token (hf auth login), or give a local folder") from None


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
