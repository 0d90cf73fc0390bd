"""The self-contained sampler: the VQ-VAE-2 (encoder, codebooks, decoder) and one prior per level, generating
images by ancestral sampling (top codes from the top prior, each lower level given the level above, then the
decoder), and turning images into codes and back.

``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` write, read and share the exported folder (format in
``pipeline.export``, model card in ``pipeline.card``) through ``huggingface_hub``'s ``ModelHubMixin``:
``from_pretrained`` takes a local folder or a Hub repo id, ``push_to_hub`` is the library's own (it saves into a
temporary folder with ``save_pretrained`` and uploads it). Loading needs only this package: no run folder, no
YAML, no training code, no code from the folder.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from pipeline import card as model_card
from pipeline.config import SAMPLE_DTYPES, VQVAEConfig, check_sampling_settings
from pipeline.data import to_float, to_uint8
from pipeline.export import CONFIG, REEXPORT, locate, read_export, write_export
from pipeline.io import UserError
from pipeline.priors import Decoding, Prior, prior_from_spec
from pipeline.sampling import cache_batch_limit, image_uniforms, is_guided, kv_cache_bytes, sample_level
from pipeline.vqvae import VQVAE2

LABEL_STREAM = 1_000  # the per-image random stream that draws uniform labels (levels use 0, 1, ...)


@dataclass
class Samples:
    images: np.ndarray  # (N, H, W, C) uint8
    codes: list[np.ndarray]  # per level, top first: (N, h, w)
    labels: np.ndarray  # (N,) int64, -1 for unconditional


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` as a device of this machine, or a one-line error naming what exists."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise UserError(f"device {name!r} is not a device name ({err}); use cpu, cuda, cuda:1 or mps") from None
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= cuda:
        raise UserError(f"device {name!r} does not exist here ({cuda} CUDA device(s)); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} does not exist here (no Apple MPS); use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r} is not supported; use cpu, cuda or mps")
    return device


class Sampler(nn.Module, ModelHubMixin, library_name=model_card.LIBRARY, tags=list(model_card.TAGS)):
    def __init__(self, vqvae_cfg: VQVAEConfig, in_channels: int, image_size: int, priors: list[Prior],
                 level_names: list[str], prior_specs: list[dict], class_names: list[str] | None = None,
                 background: str = "white") -> None:
        super().__init__()
        self.vqvae = VQVAE2(vqvae_cfg, in_channels)
        self.priors = nn.ModuleList(priors)
        self.image_size, self.level_names, self.prior_specs = image_size, level_names, prior_specs
        self.class_names = class_names
        self.background = background  # what transparent pixels of images to encode show, as in training
        self.sampling_defaults: dict[str, Any] = {}
        self.card: dict[str, Any] = {}  # facts for the model card: data, training, hardware, evaluation
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
                    prior_specs: list[dict], class_names: list[str] | None = None, background: str = "white"
                    ) -> Sampler:
        sampler = cls(vqvae.cfg, vqvae.in_channels, image_size, priors, level_names, prior_specs, class_names,
                      background)
        sampler.vqvae.load_state_dict(vqvae.state_dict())
        return sampler.eval()

    def config_dict(self) -> dict[str, Any]:
        """What rebuilds the modules, as plain values (``config.json`` of the export)."""
        return {"vqvae": asdict(self.vqvae.cfg), "in_channels": self.vqvae.in_channels, "image_size": self.image_size,
                "levels": self.level_names, "priors": self.prior_specs, "class_names": self.class_names,
                "background": self.background}

    def save_pretrained(self, save_directory: str | Path, sampling_defaults: dict | None = None, *,
                        push_to_hub: bool = False, repo_id: str | None = None, **hub: Any) -> Path:
        """Export to ``save_directory``: ``config.json`` + ``model.safetensors`` (flat ``vqvae.*`` and
        ``prior.<level>.*`` tensors), ``samples.png`` (drawn now with the sampling defaults) and the model card
        ``README.md``. ``push_to_hub=True`` then uploads it to ``repo_id`` (default: the folder's name)."""
        if sampling_defaults is not None:
            self.sampling_defaults = dict(sampling_defaults)
        tensors = {f"vqvae.{k}": v for k, v in self.vqvae.state_dict().items()}
        for name, prior in zip(self.level_names, self.priors):
            tensors.update({f"prior.{name}.{k}": v for k, v in prior.state_dict().items()})
        config = {**self.config_dict(), "sampling_defaults": self.sampling_defaults, "card": self.card}
        folder = write_export(save_directory, config, tensors, self.card_grid())
        if push_to_hub:  # ModelHubMixin.push_to_hub calls this method again on a temporary folder
            hub.pop("config", None), hub.pop("model_card_kwargs", None)
            self.push_to_hub(repo_id or folder.name, **hub)
        return folder

    def card_grid(self, per_class: int = 8, max_classes: int = 10, num: int = 64):
        """The model card's picture: ``per_class`` samples of each of the first ``max_classes`` classes as labelled
        rows, or ``num`` unconditional samples, drawn with the sampling defaults."""
        from pipeline.images import grid_image, labelled_grid

        d = self.sampling_defaults
        settings = {k: d[k] for k in ("temperature", "top_k", "top_p", "guidance", "seed") if k in d}
        if not self.num_classes:
            return grid_image(self.generate(num, labels=None, **settings), nrow=8, scale=2)
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        classes = list(range(min(self.num_classes, max_classes)))
        images = self.generate(per_class * len(classes), labels=[c for c in classes for _ in range(per_class)],
                               **settings)
        return labelled_grid([(names[c], images[i * per_class:(i + 1) * per_class]) for i, c in enumerate(classes)],
                             scale=2)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, device: str | torch.device = "cpu",
                        **hub: Any) -> Sampler:
        """Rebuild from an exported folder, or from a Hub repo id ("user/model", downloaded into the Hub cache;
        ``hub``: revision, cache_dir, force_download, local_files_only, token). A missing, corrupt, tampered or
        mismatched file gives one clear error."""
        device = resolve_device(device)
        folder = locate(pretrained_model_name_or_path, **hub)
        config, tensors = read_export(folder)
        try:
            priors = [prior_from_spec(spec) for spec in config["priors"]]
            sampler = cls(VQVAEConfig(**config["vqvae"]), config["in_channels"], config["image_size"], priors,
                          config["levels"], config["priors"], config.get("class_names"),
                          config.get("background", "white"))
            sampler.load_flat_state(tensors)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            reason = " ".join(str(err).split())[:240] or type(err).__name__  # e.g. "size mismatch for ..."
            raise UserError(f"{Path(folder) / CONFIG} does not describe the weights beside it ({reason}); "
                            f"{REEXPORT}") from None
        sampler.sampling_defaults = config.get("sampling_defaults", {})
        sampler.card = config.get("card") or {}
        return sampler.to(device).eval()

    def load_flat_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load flat ``vqvae.*`` / ``prior.<level>.*`` tensors, every name and shape checked."""
        parts = [("vqvae.", self.vqvae)] + [(f"prior.{n}.", p) for n, p in zip(self.level_names, self.priors)]
        claimed = set()
        for prefix, module in parts:
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            claimed.update(prefix + k for k in state)
            module.load_state_dict(state, strict=True)
        if len(claimed) != len(tensors):
            raise ValueError(f"unexpected tensors {sorted(set(tensors) - claimed)[:3]}")

    # ------------------------------------------------------------------------------------------------------
    def resolve_labels(self, labels: Any, indices: list[int], seed: int) -> torch.Tensor | None:
        """Labels of the images ``indices``: None, "uniform", "none", a class by name or index, a list of them
        (cycled), or a comma-separated string of them ("cat,dog", "3,5,7")."""
        c = self.num_classes
        if isinstance(labels, str):
            text = labels.strip()
            if text.lower() in ("", "none"):
                labels = None
            elif text.lower() == "uniform":
                if c == 0:
                    return None
                return torch.tensor([int(np.random.default_rng([seed, LABEL_STREAM, i]).integers(c)) for i in indices])
            else:
                labels = [x.strip() for x in text.split(",")]
        if labels is None:
            return None
        if c == 0:
            raise UserError("labels were given but this prior is unconditional (trained with "
                            "prior.class_conditional=false); leave labels out or use labels=none")
        values = [labels] if isinstance(labels, (int, np.integer)) else list(labels)
        if not values:
            raise UserError(f"labels={labels!r}: give a class name or index, a list of them, uniform or none")
        index = [self.class_index(v) for v in values]
        return torch.tensor([index[i % len(index)] for i in indices])

    def class_index(self, label: Any) -> int:
        """A class given by name ("cat") or index (3, "3") -> its index; anything else is one clear error."""
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        if isinstance(label, str) and label in names:
            return names.index(label)
        try:
            index = int(label)
        except (TypeError, ValueError):
            raise UserError(f"label {label!r} is not a class of this sampler; classes: {', '.join(names[:20])}"
                            + (", ..." if len(names) > 20 else "")) from None
        if not 0 <= index < self.num_classes:
            raise UserError(f"label {label} is outside the trained classes 0..{self.num_classes - 1} "
                            f"({', '.join(names[:20])})")
        return index

    @torch.no_grad()
    def generate_samples(self, num: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         labels: Any = "uniform", guidance: float = 1.0, seed: int = 0, batch_size: int = 250,
                         start: int = 0, indices: list[int] | None = None, use_cache: bool = True,
                         progress: bool = False, max_kv_gib: float = 0.0, dtype: str = "float32",
                         kv_cache: str = "dynamic", compile: bool = False) -> Samples:
        """Images number ``start .. start + num - 1`` (or the given ``indices``) of the stream fixed by ``seed``.
        Image i depends only on (seed, i, settings): not on the batch size or on how images are split up, so
        ``max_kv_gib`` (see ``kv_batch_size``) changes the memory, never the images. ``dtype="bfloat16"`` samples
        with bfloat16 copies of the priors (half the cache; codes differ from float32's where rounding moves a
        draw). ``kv_cache`` and ``compile`` (see ``Decoding``) change the speed of the GPT levels, not their logits
        beyond rounding."""
        try:
            check_sampling_settings(temperature, top_k, top_p, guidance)
            decoding = Decoding(kv_cache, compile)
        except ValueError as err:
            raise UserError(str(err)) from None
        if batch_size < 1 or num < 0:
            raise UserError(f"batch_size={batch_size}, num={num}: batch_size must be >= 1 and num >= 0")
        indices = list(range(start, start + num)) if indices is None else list(indices)
        all_labels = self.resolve_labels(labels, indices, seed)
        guided = is_guided(self.priors[0], guidance, all_labels)
        batch_size = self.kv_batch_size(batch_size, max_kv_gib, guided, dtype)
        priors = self.priors_in(dtype)
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance=guidance, use_cache=use_cache,
                        decoding=decoding)
        images, codes_out = [], [[] for _ in self.priors]
        from tqdm.auto import tqdm

        for b in tqdm(range(0, len(indices), batch_size), desc="sampling", disable=not progress, leave=False):
            idx = indices[b : b + batch_size]
            lab = None if all_labels is None else all_labels[b : b + batch_size].to(self.device)
            grids: list[torch.Tensor] = []
            for level, prior in enumerate(priors):  # each level given the one above
                u = image_uniforms(seed, level, idx, prior.seq_len)
                grids.append(sample_level(prior, u, lab, grids[-1] if grids else None, **settings))
            pixels = to_uint8(self.vqvae.decode_codes(grids))  # (B, C, H, W)
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

    def priors_in(self, dtype: str) -> list[Prior]:
        """The priors to sample with in ``dtype`` (a ``sample.dtype`` name): themselves in float32, else copies, so
        the weights the sampler exports stay float32."""
        if dtype not in SAMPLE_DTYPES:
            raise UserError(f"dtype={dtype!r} is not a sampling dtype; choose one of {', '.join(SAMPLE_DTYPES)}")
        if getattr(torch, dtype) == torch.float32:
            return list(self.priors)
        return [copy.deepcopy(p).to(getattr(torch, dtype)) for p in self.priors]

    def kv_batch_size(self, batch_size: int, max_kv_gib: float, guided: bool, dtype: str = "float32") -> int:
        """``batch_size``, lowered so that the key/value cache (in ``dtype``) of the level with the largest one
        fits ``max_kv_gib`` GiB (0 = no limit): at 256 px a guided batch of 250 can need hundreds of GiB."""
        if max_kv_gib <= 0:
            return batch_size
        fits = cache_batch_limit(list(self.priors), max_kv_gib * 2**30, guided, getattr(torch, dtype))
        if fits < 1:
            need = max(kv_cache_bytes(p, 1, guided, getattr(torch, dtype)) for p in self.priors) / 2**30
            raise UserError(f"max_kv_gib={max_kv_gib:g} is too small: one image's key/value cache needs {need:.3g} GiB"
                            f"{' with guidance' if guided else ''}; raise it, or 0 for no limit")
        return min(batch_size, fits)

    def load_images(self, sources: list) -> np.ndarray:
        """Image files (paths or bytes, any mode PIL opens) -> uint8 (N, H, W, C), decoded exactly as training
        decoded its images (alpha over the training background, EXIF orientation, padded or resized and cropped
        to the sampler's size and channels)."""
        from PIL import Image, UnidentifiedImageError

        from pipeline.decode import load_image_file

        out = []
        for src in sources:
            try:
                out.append(load_image_file(src, self.image_size, self.vqvae.in_channels, self.background))
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
                shown = src if isinstance(src, (str, Path)) else f"<{len(src)} bytes>"
                reason = "no such file" if isinstance(err, FileNotFoundError) else (
                    str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__)
                raise UserError(f"cannot read image {shown}: {reason}; give an image file PIL opens (PNG, JPEG, "
                                "GIF, BMP, TIFF, WebP)") from None
        return np.stack(out).transpose(0, 2, 3, 1) if out else np.zeros(
            (0, self.image_size, self.image_size, self.vqvae.in_channels), np.uint8)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> list[np.ndarray]:
        """uint8 images (N, H, W, C) of the sampler's size and channels -> code grids per level, top first."""
        arr = np.asarray(images)
        expected = (self.image_size, self.image_size, self.vqvae.in_channels)
        if arr.ndim != 4 or arr.shape[1:] != expected or arr.dtype != np.uint8:
            raise UserError(f"images of shape {arr.shape} and dtype {arr.dtype}: expected uint8 (N, "
                            f"{', '.join(map(str, expected))})")
        x = to_float(torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device))
        return [c.cpu().numpy() for c in self.vqvae.encode(x)]

    @torch.no_grad()
    def decode(self, codes: list[np.ndarray]) -> np.ndarray:
        """Code grids per level, top first (as from ``encode`` or ``generate_samples``) -> uint8 images (N, H, W, C)."""
        k = self.vqvae.cfg.codebook_size
        grids = [torch.as_tensor(np.asarray(c), dtype=torch.long, device=self.device) for c in codes]
        shapes = self.vqvae.grid_shapes(self.image_size)
        if len(grids) != len(shapes) or any(tuple(g.shape[1:]) != shape for g, shape in zip(grids, shapes)):
            raise UserError(f"code grids of shapes {[tuple(g.shape) for g in grids]}: expected (N, h, w) per level "
                            f"with (h, w) = {shapes}, top first")
        if any(g.numel() and (g.min() < 0 or g.max() >= k) for g in grids):
            raise UserError(f"codes outside 0..{k - 1}, the codebook of this sampler")
        return to_uint8(self.vqvae.decode_codes(grids)).permute(0, 2, 3, 1).cpu().numpy()

    def generate(self, num: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, labels: Any = "uniform",
                 guidance: float = 1.0, seed: int = 0, batch_size: int = 250) -> np.ndarray:
        """``num`` uint8 images (N, H, W, C)."""
        return self.generate_samples(num, temperature, top_k, top_p, labels, guidance, seed, batch_size).images
