"""A TorchScript network run by ONNX Runtime on the CPU: exported once to an ``.onnx`` file cached beside it.

The FID Inception network runs 1.7-2.3x faster in ONNX Runtime's CPU kernels than in TorchScript with a
channels_last input on this machine (``make bench``, inception rows), with features equal within float32
rounding. ``cached_onnx`` exports the TorchScript file with torch's TorchScript-based exporter (opset 17, a
dynamic batch axis) and writes ``NAME.onnx`` beside it with a sidecar ``NAME.onnx.json`` recording the source's
sha256, the torch and onnx versions, the opset and the export's own sha256; a cache whose record differs (another
source file, another torch or onnx) or whose file does not match its hash is exported again. ``OnnxModule`` runs
the result with ``CPUExecutionProvider``.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.io import atomic_write_bytes, atomic_write_text

OPSET = 17
INSTALL_HINT = "pip install onnxruntime onnx (make install does)"


def onnx_available() -> bool:
    """Both packages the ONNX runtime path needs: onnx (the export) and onnxruntime (the runs)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def export_record(source_sha256: str) -> dict:
    """What an export depends on: the source file and the exporter's versions."""
    import onnx

    return {"source_sha256": source_sha256, "torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET}


def export_onnx(net: torch.nn.Module, example: torch.Tensor) -> bytes:
    """``net`` as an ONNX model with a dynamic batch axis (input ``x``, output ``y``)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its successor; it is the one that
        warnings.simplefilter("ignore")  # takes a TorchScript module
        torch.onnx.export(net, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=OPSET)
    return buffer.getvalue()


def _cache_matches(model: Path, sidecar: Path, record: dict) -> bool:
    try:
        stored = json.loads(sidecar.read_text())
        if {k: stored.get(k) for k in record} != record:
            return False
        return hashlib.sha256(model.read_bytes()).hexdigest() == stored.get("onnx_sha256")
    except (OSError, ValueError, AttributeError):
        return False


def cached_onnx(source: Path, source_sha256: str, load: Callable[[], torch.nn.Module], example: torch.Tensor,
                log=print) -> Path | bytes:
    """The ONNX export of the TorchScript file ``source`` (sha256 ``source_sha256``): ``source`` with the suffix
    ``.onnx`` when its sidecar record matches, else exported now from ``load()`` on ``example`` and written there
    atomically (model first, then the record). A folder it cannot write costs the cache, not the run: the export
    is returned as bytes, with a warning.

    Raises:
        RuntimeError: the export failed; the message names the fallback.
    """
    model, sidecar = source.with_suffix(".onnx"), source.with_suffix(".onnx.json")
    record = export_record(source_sha256)
    if _cache_matches(model, sidecar, record):
        return model
    with _export_lock(source.with_suffix(".onnx.lock")):  # a second process waits for the first one's export
        if _cache_matches(model, sidecar, record):
            return model
        return _export_and_cache(source, load, example, model, sidecar, record, log)


@contextmanager
def _export_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` while held (released by the OS however the process ends); no lock, and
    no error, where the file cannot be opened (a read-only folder: each process then exports for itself)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _export_and_cache(source: Path, load: Callable[[], torch.nn.Module], example: torch.Tensor, model: Path,
                      sidecar: Path, record: dict, log) -> Path | bytes:
    log(f"exporting {source.name} to ONNX once for onnxruntime (cached as {model})")
    try:
        data = export_onnx(load(), example)
    except Exception as err:  # the exporter raises many kinds; one line says what failed and what to do
        raise RuntimeError(f"could not export {source} to ONNX with torch {torch.__version__} "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                           "use evaluate.inception_runtime=torch") from err
    try:
        atomic_write_bytes(model, data)
        atomic_write_text(sidecar, json.dumps({**record, "onnx_sha256": hashlib.sha256(data).hexdigest()}, indent=1))
    except OSError as err:
        log(f"warning: the ONNX export is not cached ({err}); it is exported again next time")
        return data
    return model


class OnnxModule:
    """An ONNX model run by onnxruntime's CPUExecutionProvider with ``threads`` intra-op threads: float32 tensor
    in, float32 CPU tensor out."""

    def __init__(self, model: Path | bytes, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
        self.session = onnxruntime.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                                    providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: array})[0])
