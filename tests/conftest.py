import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# One thread per test process (small ops on a busy 2-core machine run far slower on two) unless OMP_NUM_THREADS
# says otherwise: the suite is also run with OMP_NUM_THREADS=2 to show that no result depends on the thread count.
torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))

SMOKE = "configs/smoke.yaml"


def rounding_tolerance(reference: torch.Tensor, ulps: int = 32) -> float:
    """How far two float computations of ``reference`` may drift apart by rounding alone (a batch of another
    shape, another kernel, thread count or CPU kind): ``ulps`` units in the last place of its dtype, at the
    scale of its largest value. Results of different computations are compared within this, never exactly;
    the effects the tests look for are orders of magnitude larger."""
    return ulps * torch.finfo(reference.dtype).eps * float(reference.detach().abs().max())


def _rows(x) -> np.ndarray:
    """(N, ...) tensor or array, or a list of them (code grids per level) -> (N, everything else) numpy."""
    parts = x if isinstance(x, (list, tuple)) else [x]
    arrays = [np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p) for p in parts]
    return np.concatenate([a.reshape(len(a), -1) for a in arrays], axis=1)


def assert_same_draws(a, b, max_diverged: int = 1) -> np.ndarray:
    """Discrete draws (sampled codes, argmax tokens, nearest codes) of two float computations of the same thing that
    differ in batch shape, process count, cache or kernel: equal row for row (a row is an image or a sequence),
    but for at most ``max_diverged`` rows. A draw flips only when rounding moves a value across a decision boundary
    (a uniform within ~1e-6 of a step of the CDF, two logits or distances within ~1e-6), odds of about 1e-6 per
    draw, and a flip early in a sequence changes the rest of its row; a real bug (rows mixed up, a stale cache)
    changes many rows. Returns the (N,) mask of rows that agree."""
    ra, rb = _rows(a), _rows(b)
    assert ra.shape == rb.shape, (ra.shape, rb.shape)
    same = (ra == rb).all(1)
    assert (~same).sum() <= max_diverged, f"{int((~same).sum())} of {len(same)} rows differ"
    return same


def assert_same_images(images_a, codes_a, images_b, codes_b, max_diverged: int = 1) -> None:
    """Sampled uint8 images of two computations (see ``assert_same_draws``): the same codes, and where the codes
    agree pixels within 1 (the decoder's floats differ by rounding, which can move a value across a .5 step)."""
    same = assert_same_draws(codes_a, codes_b, max_diverged)
    diff = np.abs(np.asarray(images_a, np.int16)[same] - np.asarray(images_b, np.int16)[same])
    assert diff.size == 0 or diff.max() <= 1, f"pixels differ by up to {diff.max()}"


def run(module, run_dir, *overrides, fresh=False, config=SMOKE):
    """Call a stage's main() like the command line would; returns the exit code."""
    argv = ["--config", config, "--run", str(run_dir), *overrides] + (["--fresh"] if fresh else [])
    return module.main(argv)


@pytest.fixture(scope="session", autouse=True)
def _reference_dir(tmp_path_factory):
    """Real sets' statistics (evaluate.reference_dir) go to a folder of this session, never the user's cache;
    tests that need a cache of their own pass evaluate.reference_dir."""
    os.environ["PIPELINE_REFERENCE_DIR"] = str(tmp_path_factory.mktemp("reference"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Stages 1, 2 and sample on the smoke config, once per test session (the folder is shared: copy it
    before changing anything in it)."""
    from stages import sample, stage1, stage2

    run_dir = tmp_path_factory.mktemp("smoke")
    assert run(stage1, run_dir) == 0
    assert run(stage2, run_dir) == 0
    assert run(sample, run_dir) == 0
    return run_dir


def copy_run(src: Path, dst: Path, parts=("config.yaml", "stage1", "codes", "stage2", "samples", "sampler")) -> Path:
    """A private copy of (parts of) a run folder; eval/ is left out so each copy trains its own classifier."""
    dst.mkdir(parents=True)
    for part in parts:
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part)
        elif (src / part).is_file():
            shutil.copy2(src / part, dst / part)
    return dst


def image_folder(root: Path, n: int = 6) -> Path:
    """Two class sub-folders ``a`` and ``b`` of ``n`` random grey 20 px PNGs each."""
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            arr = np.random.default_rng(i).integers(0, 255, (20, 20)).astype(np.uint8)
            Image.fromarray(arr, "L").save(root / cls / f"{i}.png")
    return root


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A tiny PNG whose header claims side x side pixels: PIL refuses it as a decompression bomb when opened."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path
