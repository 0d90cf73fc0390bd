"""Peak memory of a process, without importing torch (the prdc worker measures a process that has none)."""

from __future__ import annotations


def vmhwm_bytes(pid: int | str = "self") -> int | None:
    """Peak resident memory of a live process from /proc (Linux): ``VmHWM``. Unlike ``ru_maxrss`` it starts
    afresh at exec, so a child does not inherit the parent's peak (``ru_maxrss`` keeps the pre-exec one)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
