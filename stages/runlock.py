"""One process per run folder: a lock file that a second stage command on the same folder finds and refuses.

The lock is an ``flock`` on ``<folder>/.lock``, which the operating system releases when the process ends in
any way (exit, exception, SIGKILL, a crash of the machine's process), so a lock never outlives its holder. The
file records who holds it (pid, host, command, start time) for the refusal message; a file left behind by a
process that died is taken over with a warning.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.io import UserError

LOCK_NAME = ".lock"


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    pid = holder.get("pid", "?")
    where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"process {pid}{where} ({holder.get('command', 'unknown command')}{since})"


@contextmanager
def run_folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the ``with`` block; raise :class:`UserError` naming
    the holder if another process has it. A folder this call created is removed again if it is left empty."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_holder(fd))
            os.close(fd)
            raise UserError(f"run folder {folder} is in use by {holder}; wait for it to finish or stop it, or "
                            "choose another run folder (RUN=... or --run)") from None
        try:  # the holder may have removed the file between our open and our lock: lock the new file instead
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        stale = _holder(fd)
        if stale:
            print(f"warning: took over the lock of run folder {folder} from {_describe(stale)}, which is no longer "
                  "running", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        yield path
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)  # releases the flock
        if created:
            try:
                folder.rmdir()  # only if empty: a command that wrote nothing leaves no folder behind
            except OSError:
                pass


def _command_line() -> str:
    """How this process was started, as the user typed it (``python -m stages.stage1 ...``), shortened."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else sys.argv[0]
    text = " ".join([head, *sys.argv[1:]])
    return text if len(text) <= 160 else text[:157] + "..."


def rank_zero_of_launch() -> bool:
    """Whether this process is rank 0 by the launcher's environment (before Fabric exists): only rank 0 holds the
    lock, the processes a launcher started beside it share the run."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True
