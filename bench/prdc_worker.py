"""One precision/recall measurement in its own process, so its memory peak is its own:
``python -m bench.prdc_worker --impl ours|prdc --n N``. Prints JSON lines: one after the set-up (the features
in memory, the implementation warmed up on a small set), one with the timings and the four numbers."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import time

import numpy as np

from bench.memory import vmhwm_bytes

DIM, K = 2048, 3


def features(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 features: real ~ N(0, 1), fake ~ N(0.1, 1) (precision and recall around 0.3)."""
    rng = np.random.default_rng([seed, n])
    real = rng.standard_normal((n, dim), dtype=np.float32)
    fake = rng.standard_normal((n, dim), dtype=np.float32)
    fake += 0.1
    return real, fake


def _peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (Linux), else ru_maxrss (which may include the parent's peak)."""
    hwm = vmhwm_bytes()
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _implementation(name: str, device: str):
    if name == "ours":
        from pipeline.metrics.prdc import precision_recall

        return lambda real, fake, k: precision_recall(real, fake, k=k, device=device)
    import prdc

    def theirs(real, fake, k):
        with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
            return prdc.compute_prdc(real, fake, nearest_k=k)

    return theirs


def _report(**values) -> None:
    print(json.dumps(values), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", choices=("ours", "prdc"), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    fn = _implementation(args.impl, args.device)
    small_real, small_fake = features(256, args.dim)
    fn(small_real, small_fake, args.k)  # warm-up: imports, thread pools
    real, fake = features(args.n, args.dim)
    _report(stage="setup", rss_setup_bytes=_peak_rss_bytes(), input_bytes=real.nbytes + fake.nbytes)
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    times, result = [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = fn(real, fake, args.k)
        times.append(time.perf_counter() - t0)
    extra = {}
    if args.device.startswith("cuda"):
        import torch

        extra["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    _report(stage="done", times_s=times, values={k: float(v) for k, v in result.items()},
            rss_peak_self_bytes=_peak_rss_bytes(), **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
