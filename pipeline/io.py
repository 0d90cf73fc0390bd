"""Files: atomic writes, safe checkpoint loading, the user-facing error type and how errors reach the user.

Every file a run writes goes to a temporary name in the same folder first and is then renamed, so a
killed process never leaves a half-written checkpoint, config or image behind.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import sys
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


def atomic_savez_stored(path: str | Path, **arrays: Any) -> Path:
    """``atomic_savez`` without compression: each array lies in the file as is, so readers can memory-map it
    (``pipeline.samples``) instead of inflating all of it to read a few rows."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

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


# ----------------------------------------------------------------------------------------------------------
# errors, as the user sees them


def debug_requested(args) -> bool:
    """--debug on the command line, or DEBUG set (not 0) in the environment."""
    return bool(getattr(args, "debug", False)) or os.environ.get("DEBUG", "") not in ("", "0")


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: the file, the reason, the fix."""
    target = err.filename2 or err.filename  # a copy or rename names its source first, the file we meant second
    where = f" {target}" if target else ""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space on that disk or choose a folder on another one"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose a writable folder or fix its permissions"
    else:
        fix = "check the path and the disk"
    verb = "write" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM) else "use"
    return f"cannot {verb}{where}: {reason}; {fix} (files written before are kept)"


def report_errors(fn: Callable[[], object], debug: bool) -> int:
    """Run ``fn``; a user's error becomes one ``error:`` line and exit code 2 (the traceback with ``debug``)."""
    try:
        fn()
    except (UserError, OSError) as err:  # ConfigError is a UserError
        if debug:
            raise
        message = os_error_message(err) if isinstance(err, OSError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        # Fabric's own launcher SIGKILLs the main process (rank 0) as soon as a child it started exits non-zero,
        # which would turn rank 0's 130 into 137 while it is still exiting; the children's code reaches no user.
        return 0 if _child_of_fabric_launcher() else 130
    return 0


def _child_of_fabric_launcher() -> bool:
    """A process started by Fabric's subprocess launcher (not torchrun, ``fabric run`` or SLURM): LOCAL_RANK > 0."""
    return (os.environ.get("LOCAL_RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" not in os.environ
            and "SLURM_JOB_ID" not in os.environ)
