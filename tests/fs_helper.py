"""Run a command on a run folder that lies on a full or a read-only file system, and record what it did.

    unshare -m python -m tests.fs_helper {full,readonly} SRC DST RESULT.json -- command ...

Called inside a private mount namespace (``unshare -m`` as root, ``unshare -rm`` otherwise), so the mounts vanish
with the process: ``full`` mounts a tmpfs on DST with room for SRC's files and little more, ``readonly`` bind-mounts
DST read-only. SRC is copied to DST first; RESULT gets the command's exit code and output and the sha256 of every
file under DST before and after it ran (a tmpfs is gone once the namespace ends, so it is read from inside).
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

HEADROOM = 96 * 1024  # bytes a full disk still has: a lock file and a config fit, a checkpoint does not


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    mode, src, dst, result = sys.argv[1:5]
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if mode == "full":
        used = sum(-(-p.stat().st_size // 4096) * 4096 for p in src.rglob("*") if p.is_file())
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + HEADROOM}", "tmpfs", str(dst)], check=True)
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copytree(src, dst, dirs_exist_ok=True)
        subprocess.run(["mount", "--bind", str(dst), str(dst)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)
    before = snapshot(dst)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "before": before,
           "after": snapshot(dst)}
    Path(result).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
