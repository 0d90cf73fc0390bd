import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

SMOKE = "configs/smoke.yaml"


def rounding_tolerance(reference: torch.Tensor, ulps: int = 32) -> float:
    """How far two float computations of ``reference`` may drift apart by rounding alone (a batch of another
    shape, another kernel, thread count or CPU kind): ``ulps`` units in the last place of its dtype, at the
    scale of its largest value. Results of different computations are compared within this, never exactly;
    the effects the tests look for are orders of magnitude larger."""
    return ulps * torch.finfo(reference.dtype).eps * float(reference.detach().abs().max())


def run(module, run_dir, *overrides, fresh=False, config=SMOKE):
    """Call a stage's main() like the command line would; returns the exit code."""
    argv = ["--config", config, "--run", str(run_dir), *overrides] + (["--fresh"] if fresh else [])
    return module.main(argv)


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
