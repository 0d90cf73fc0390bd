"""What every benchmark shares: the run context, the result row, timing, and child processes with a time budget
and a measured memory peak."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.memory import vmhwm_bytes

ROOT = Path(__file__).resolve().parent.parent  # the project root: stages and configs are found from here


@dataclass
class Context:
    """Settings of one ``bench.run`` invocation, handed to every benchmark."""

    quick: bool
    device: torch.device
    threads: int  # torch intra-op threads of this process (and of the child processes)
    threads_forced: bool  # set with --threads (passed on to the children); False = torch's default
    python: str = sys.executable

    def child_env(self) -> dict[str, str]:
        """Environment of a child process: the same thread count as this one when --threads was given."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if self.threads_forced:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


@dataclass
class Row:
    """One line of the results table. ``ratio`` is always "how many times better ours is" (> 1: ours wins)."""

    benchmark: str
    figure: str
    ours: float | str | None
    baseline: float | str | None = None
    unit: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Result:
    """What a benchmark returns: its rows, the settings it ran with, and raw measurements for the JSON."""

    rows: list[Row]
    settings: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def compare(benchmark: str, figure: str, ours: float | str, baseline: float | str | None, unit: str,
            higher_is_better: bool, min_ratio: float | None = None, note: str = "") -> Row:
    """A row comparing two measured numbers (a string is a failure or a remark: no ratio then); with
    ``min_ratio`` the target is "ours at least that many times better"."""
    ratio = None
    if isinstance(ours, (int, float)) and isinstance(baseline, (int, float)) and ours > 0 and baseline > 0:
        ratio = ours / baseline if higher_is_better else baseline / ours
    target, met = "", None
    if min_ratio is not None:
        target = f">= {min_ratio:g}x"
        met = ratio is not None and ratio >= min_ratio
    return Row(benchmark, figure, ours, baseline, unit, ratio, target, met, note)


def scaled(t: Timing | str, scale: float = 1.0, invert: float | None = None) -> float | str:
    """A timing as a table value: ``median * scale``, or ``invert / median`` (a rate), or the failure text."""
    if isinstance(t, str):
        return t
    return invert / t.median if invert is not None else t.median * scale


def failure(exc: BaseException) -> str:
    """``failed: <first line of the error>`` for a table cell."""
    text = str(exc).strip().splitlines()
    reason = text[0] if text else ""
    return f"failed: {type(exc).__name__}" + (f": {reason[:160]}" if reason else "")


# ---------------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times mean something (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: the repeats after warm-up, and the warm-up calls themselves (e.g. compile time)."""

    times: list[float]
    warmup_times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "times_s": self.times, "warmup_s": self.warmup_times}


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, Timing | str]:
    """Time several callables side by side: each is warmed up, then the repeats alternate between them (a
    background load hits all of them alike). A callable that raises becomes ``"failed: ..."`` and is dropped."""
    out: dict[str, Timing | str] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in fns.items():
        warm = []
        try:
            for _ in range(warmup):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                warm.append(time.perf_counter() - t0)
        except Exception as exc:  # a failing variant is a result, not a crash
            out[name] = failure(exc)
            print(f"  {name}: {out[name]}\n{traceback.format_exc(limit=3)}", file=sys.stderr)
            continue
        out[name] = Timing([], warm)
        live[name] = fn
    for _ in range(repeats):
        for name, fn in live.items():
            timing = out[name]
            if not isinstance(timing, Timing):
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                timing.times.append(time.perf_counter() - t0)
            except Exception as exc:
                out[name] = failure(exc)
    return out


# --------------------------------------------------------------------------------------------- subprocesses


@dataclass
class ChildRun:
    """A finished (or killed) child process: exit status, wall time, peak resident memory, its output."""

    returncode: int | None  # None when it was killed at the time budget
    seconds: float
    peak_rss_bytes: int  # the child's own high-water mark (VmHWM), also when it was killed
    stdout: str
    stderr: str
    cpu_seconds: float = 0.0  # user + system time of the child (its own threads, not its children's)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def reported(self) -> dict[str, Any]:
        """Every stdout line that parses as a JSON object, merged in order (how the workers report)."""
        merged: dict[str, Any] = {}
        for line in self.stdout.splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                merged.update(value)
        return merged

    def error_tail(self, lines: int = 1) -> str:
        tail = [x for x in self.stderr.strip().splitlines() if x.strip()]
        return " | ".join(tail[-lines:])[:300]


def run_child(cmd: list[str], ctx: Context, timeout: float | None = None, log_dir: Path | None = None,
              name: str = "child") -> ChildRun:
    """Run ``cmd`` from the project root; kill it after ``timeout`` seconds. Its output goes to files (in
    ``log_dir`` when given) so a chatty child cannot block on a full pipe. The peak memory is the child's
    ``VmHWM``, polled every 20 ms (a peak in the last 20 ms before it exits can be missed: workers that need
    it exact report their own); without /proc, ``wait4``'s ``ru_maxrss``, which includes the parent's peak."""
    import tempfile

    folder = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    out_path, err_path = folder / f"{name}.out", folder / f"{name}.err"
    peak = 0
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ctx.child_env(), stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
        returncode: int | None = None
        while True:
            peak = max(peak, vmhwm_bytes(proc.pid) or 0)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                returncode = os.waitstatus_to_exitcode(status)
                break
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
        proc.returncode = returncode if returncode is not None else -9  # reaped by wait4 above, tell Popen
    if not peak:
        peak = int(usage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux, bytes on macOS
    return ChildRun(returncode, seconds, peak, out_path.read_text(errors="replace"),
                    err_path.read_text(errors="replace"), usage.ru_utime + usage.ru_stime)
