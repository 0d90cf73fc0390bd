"""Files: atomic writes, safe checkpoint loading, and the user-facing error type.

Every file a run writes goes to a temporary name in the same folder first and is then renamed, so a
killed process never leaves a half-written checkpoint, config or image behind.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class UserError(RuntimeError):
    """An error the user can fix (bad input, missing file, wrong order of stages): printed as one line."""


def as_os_error(err: BaseException, path: str | Path) -> BaseException:
    """torch's file writer reports a full disk or a failed write as a RuntimeError ("unexpected pos ...", "file write
    failed"); turn it into the OSError it is, naming ``path``. Call it before removing the partial file: a disk
    with less than 1 MiB free then is taken as full. Other errors come back as they are."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not any(m in text for m in ("inline_container", "PytorchStreamWriter",
                                                                         "write failed")):
        return err
    try:
        full = shutil.disk_usage(Path(path).parent).free < 2**20
    except OSError:
        full = False
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def _atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        failed = as_os_error(err, path)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if failed is not err:
            raise failed from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_torch_save(path: str | Path, obj: Any) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_png(path: str | Path, image: Any) -> Path:
    """Save a PIL image as PNG atomically."""
    return _atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def atomic_savez(path: str | Path, **arrays: Any) -> Path:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    return _atomic(path, write)


def atomic_save_npy(path: str | Path, array: Any) -> Path:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return _atomic(path, write)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors: a missing, truncated, corrupt or pickle-bearing
    file is refused, never executed, and the message names the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    corrupt = (f"checkpoint {path} is corrupt or truncated ({{}}); delete it, or rerun the stage that writes it with "
               "--fresh (make ... ARGS=--fresh) to start that stage over")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one has no central directory
        raise UserError(corrupt.format("not a complete checkpoint archive"))
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global by default|\.?\n|$)",
                          str(err))
        reason = found.group(1).strip() if found else type(err).__name__
        raise UserError(
            f"checkpoint {path} was refused by the safe loader (weights_only=True): {reason[:200]}. It holds more "
            "than tensors and plain values (possibly code to run) and was not written by this project; delete it"
        ) from None
    except Exception as err:  # zip, storage or format errors of a damaged file
        raise UserError(corrupt.format(type(err).__name__)) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} does not hold a dict; it was not written by this project")
    return ckpt
