"""Runs that survive faults: SIGKILL and Ctrl-C (SIGINT) of real stage commands, atomic checkpoints, corrupt or
planted checkpoints, NaN/Inf losses. The subprocesses are tiny smoke-config runs on one CPU thread each."""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import FabricConfig, TrainConfig
from pipeline.fabric import make_fabric
from pipeline.io import UserError, load_checkpoint
from pipeline.training import Task, fit
from stages import stage1, stage2
from tests.conftest import SMOKE, copy_run, run

ROOT = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    """Temporary or hidden files (half-written or abandoned) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and (p.name.startswith(".") or p.name.endswith(".tmp")))


def step_of(path: Path) -> int:
    return load_checkpoint(path)["step"]


# ---------------------------------------------------------------------------------------------------------
# NaN / Inf losses: fit() with a fake task


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x)


def nan_task(bad_steps: set[int], value: float = float("nan")) -> Task:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 3), torch.randn(64, 1))

    def training_step(fabric, model, batch, step):
        x, y = batch
        loss = (model(x) - y).pow(2).mean()
        if step in bad_steps:
            loss = loss * value
        return loss, {}

    return Task(model=Affine(), train_set=data, training_step=training_step, count_units=lambda b: len(b[0]))


def collate_pairs(task: Task) -> Task:
    """The loop hands the task a list of (x, y) pairs; stack them like the image sets' __getitems__ does."""
    step_fn = task.training_step

    def training_step(fabric, model, batch, step):
        if isinstance(batch, list):
            batch = (torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]))
        return step_fn(fabric, model, batch, step)

    task.training_step = training_step
    return task


@pytest.fixture(scope="module")
def fabric():
    return make_fabric(FabricConfig(precision="32-true", threads=1))


def tcfg(**kw) -> TrainConfig:
    args = dict(max_steps=8, batch_size=8, lr=1e-2, warmup_steps=0, checkpoint_every=2, eval_every=100, log_every=1,
                channels_last=False)
    args.update(kw)
    return TrainConfig(**args)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(fabric, tmp_path, value):
    task = collate_pairs(nan_task({5}, value))
    with pytest.raises(UserError) as err:
        fit(fabric, task, tcfg(), tmp_path)
    text = str(err.value)
    assert "not finite" in text and "at step 5" in text and "skip_nonfinite=true" in text and "\n" not in text
    assert str(tmp_path / "last.ckpt") in text
    assert step_of(tmp_path / "last.ckpt") == 4  # the checkpoint before the bad step, untouched
    assert leftovers(tmp_path) == []


def test_nonfinite_loss_at_first_step_says_nothing_was_saved(fabric, tmp_path):
    with pytest.raises(UserError, match="at step 0") as err:
        fit(fabric, collate_pairs(nan_task({0})), tcfg(), tmp_path)
    assert "no checkpoint" in str(err.value)
    assert not (tmp_path / "last.ckpt").exists()


@pytest.mark.parametrize("bad", [{3}, {7}, {1, 3, 4}])  # 7: the last step, also a checkpoint step
def test_skip_nonfinite_skips_the_batch_and_finishes(fabric, tmp_path, bad):
    task = collate_pairs(nan_task(bad))
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    fit(fabric, task, tcfg(skip_nonfinite=True), tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["step"] == 8  # skipped steps still count: data order and schedule stay addressed by step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert any(not torch.equal(before[k], v) for k, v in ckpt["model"].items())  # the good steps trained
    assert leftovers(tmp_path) == []


def test_skipped_step_leaves_weights_and_optimizer_untouched(fabric, tmp_path):
    """Three clean steps, or three clean steps and a fourth whose loss is NaN, skipped: the same weights."""
    fit(fabric, collate_pairs(nan_task(set())), tcfg(max_steps=3, min_lr_ratio=1.0), tmp_path / "clean")
    fit(fabric, collate_pairs(nan_task({3})), tcfg(max_steps=4, min_lr_ratio=1.0, skip_nonfinite=True),
        tmp_path / "skip")
    a = load_checkpoint(tmp_path / "clean" / "last.ckpt")["model"]
    b = load_checkpoint(tmp_path / "skip" / "last.ckpt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def noisy(ctrl_c_at: int = -1, times: int = 1) -> Task:
    """A task whose loss uses the global RNG (like dropout or code restarts); Ctrl-C in the middle of a step."""
    task = collate_pairs(nan_task(set()))
    step_fn = task.training_step

    def training_step(fabric, model, batch, step):
        loss, logs = step_fn(fabric, model, batch, step)
        if step == ctrl_c_at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs in between
        return loss * (1 + torch.rand(())), logs

    task.training_step = training_step
    return task


def test_ctrl_c_finishes_the_step_then_saves(fabric, tmp_path, capsys):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit(fabric, noisy(ctrl_c_at=4), tcfg(max_steps=8), tmp_path)
    assert step_of(tmp_path / "last.ckpt") == 5  # step 4 (0-based) completed, then saved though 5 % 2 != 0
    assert f"train: interrupted; saved {tmp_path / 'last.ckpt'} at step 5; run again to resume" in \
        capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back
    assert leftovers(tmp_path) == []


def test_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(fabric, tmp_path, capsys):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit(fabric, noisy(ctrl_c_at=4, times=2), tcfg(max_steps=8), tmp_path)
    assert step_of(tmp_path / "last.ckpt") == 4  # the regular checkpoint before; the half-done step is not saved
    assert f"train: interrupted at once; {tmp_path / 'last.ckpt'} is kept" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is handler


def test_resumed_run_equals_the_uninterrupted_run(fabric, tmp_path):
    """Data order addressed by step, and the RNG state restored after the data loader draws its seed: a loss that
    uses the global RNG (like dropout or code restarts) gives the same weights with or without a stop."""
    fit(fabric, noisy(), tcfg(max_steps=6, grad_clip=0), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        fit(fabric, noisy(ctrl_c_at=2), tcfg(max_steps=6, grad_clip=0), tmp_path / "stopped")
    assert step_of(tmp_path / "stopped" / "last.ckpt") == 3  # saved on Ctrl-C (checkpoint_every is 2)
    torch.manual_seed(123)  # whatever happened in between
    fit(fabric, noisy(), tcfg(max_steps=6, grad_clip=0), tmp_path / "stopped")
    a = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    b = load_checkpoint(tmp_path / "stopped" / "last.ckpt")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------------------------------------------------
# SIGKILL and Ctrl-C of a real stage-1 command, then the same command again

S1 = ["stage1.max_steps=150", "stage1.checkpoint_every=10", "stage1.eval_every=1000", "stage1.log_every=10"]


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def start_stage(stage: str, run_dir: Path, log: Path, overrides: list[str]) -> subprocess.Popen:
    """The command a user types; stdout and stderr to files (pipes could fill up and stall it)."""
    cmd = [sys.executable, "-m", f"stages.{stage}", "--config", SMOKE, "--run", str(run_dir), *overrides]
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=out, stderr=err)  # the child keeps its copies


def checkpoint_id(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def wait_for_new_checkpoint(proc: subprocess.Popen, path: Path, timeout: float = 240) -> None:
    """Until ``path`` is (re)written by ``proc``: a new file appears under that name (atomic rename)."""
    before, t0 = checkpoint_id(path), time.monotonic()
    while checkpoint_id(path) in (None, before):
        assert proc.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.01)


def shown_step(err_file: Path) -> int:
    """The last step the progress bar showed (a lower bound of the steps done)."""
    steps = [int(m) for m in re.findall(r"\| *(\d+)/150 \[", err_file.read_text())]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """SIGKILL at a random moment after the first checkpoint; the same command again, Ctrl-C (SIGINT) after its
    first new checkpoint; the same command a third time (in this process) to the end. And one uninterrupted run."""
    base = tmp_path_factory.mktemp("faults")
    run_dir, rng = base / "run", random.Random()
    out: dict = {"run": run_dir}

    killed = start_stage("stage1", run_dir, base / "killed", S1)
    wait_for_new_checkpoint(killed, run_dir / "stage1" / "last.ckpt")
    delay = rng.uniform(0.0, 0.6)
    print(f"SIGKILL {delay:.2f} s after the first checkpoint")
    time.sleep(delay)
    killed.send_signal(signal.SIGKILL)
    out["kill_rc"] = killed.wait(60)
    out["kill_shown"] = shown_step(base / "killed.err")
    out["kill_leftovers"] = leftovers(run_dir)
    out["kill_step"] = step_of(run_dir / "stage1" / "last.ckpt")  # loads: the checkpoint is complete
    # what a kill during a save leaves behind; the next run must not trip over it
    (run_dir / "stage1" / ".last.ckpt.tmp").write_bytes(b"half a checkpoint")

    stopped = start_stage("stage1", run_dir, base / "stopped", S1)
    wait_for_new_checkpoint(stopped, run_dir / "stage1" / "last.ckpt")
    delay = rng.uniform(0.0, 0.3)
    print(f"SIGINT {delay:.2f} s after the resumed run's first checkpoint")
    time.sleep(delay)
    stopped.send_signal(signal.SIGINT)
    out["int_rc"] = stopped.wait(120)
    out["int_out"] = (base / "stopped.out").read_text()
    out["int_err"] = (base / "stopped.err").read_text()
    out["int_shown"] = shown_step(base / "stopped.err")
    out["int_step"] = step_of(run_dir / "stage1" / "last.ckpt")
    return out


@pytest.mark.slow
def test_sigkill_leaves_the_last_complete_checkpoint(interrupted):
    assert interrupted["kill_rc"] == -signal.SIGKILL
    step = interrupted["kill_step"]
    assert 10 <= step < 150 and step % 10 == 0
    assert interrupted["kill_shown"] - step <= 10  # at most checkpoint_every steps lost
    # a kill during a save leaves at most the hidden temporary, never a file named like a checkpoint
    # a half-written checkpoint, and the lock file of the killed run (its lock went with the process)
    assert all(f in ("stage1/.last.ckpt.tmp", "stage1/.best.ckpt.tmp", ".lock") for f in interrupted["kill_leftovers"])


@pytest.mark.slow
def test_rerun_after_sigkill_resumes_and_ctrl_c_saves(interrupted):
    run_dir, out = interrupted["run"], interrupted["int_out"]
    last = run_dir / "stage1" / "last.ckpt"
    assert f"stage 1: resuming from {last} at step {interrupted['kill_step']}" in out
    assert interrupted["int_rc"] == 130
    step = interrupted["int_step"]
    assert interrupted["kill_step"] < step < 150 and step >= interrupted["int_shown"]
    assert f"stage 1: interrupted; saved {last} at step {step}; run again to resume" in out
    assert interrupted["int_err"].strip().endswith("interrupted") and "Traceback" not in interrupted["int_err"]


@pytest.mark.slow
def test_third_run_finishes_as_well_as_an_uninterrupted_run(interrupted, tmp_path, capsys):
    run_dir = interrupted["run"]
    assert run(stage1, run_dir, *S1) == 0
    assert f"at step {interrupted['int_step']}" in capsys.readouterr().out
    resumed = load_checkpoint(run_dir / "stage1" / "last.ckpt")
    assert resumed["step"] == 150
    assert leftovers(run_dir) == []  # the stale temporary was replaced by a real save and renamed
    assert run(stage1, tmp_path / "straight", *S1) == 0
    straight = load_checkpoint(tmp_path / "straight" / "stage1" / "last.ckpt")
    # data order addressed by step, model, optimizer, schedule and RNG restored: the same run as without faults
    print("held-out mse: interrupted", resumed["metrics"]["mse"], "straight", straight["metrics"]["mse"])
    assert resumed["metrics"]["mse"] == pytest.approx(straight["metrics"]["mse"], rel=1e-6)  # bit-exact on CPU


# SIGKILL of a real stage-2 command: two priors trained one after the other, killed while the second one trains

S2 = ["stage2.max_steps=400", "stage2.checkpoint_every=25", "stage2.eval_every=1000", "stage2.log_every=25"]


@pytest.mark.slow
def test_stage2_killed_during_the_bottom_prior_resumes_and_matches_an_uninterrupted_run(smoke_run, tmp_path, capsys):
    run_dir = copy_run(smoke_run, tmp_path / "run", parts=("config.yaml", "stage1"))
    killed = start_stage("stage2", run_dir, tmp_path / "killed", S2)
    bottom = run_dir / "stage2" / "bottom" / "last.ckpt"
    wait_for_new_checkpoint(killed, bottom)
    delay = random.uniform(0.0, 0.5)
    print(f"SIGKILL {delay:.2f} s after the bottom prior's first checkpoint")
    time.sleep(delay)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL
    assert step_of(run_dir / "stage2" / "top" / "last.ckpt") == 400  # the top prior had finished
    step = step_of(bottom)
    assert 25 <= step < 400 and step % 25 == 0
    assert all(f.endswith(".tmp") or f == ".lock" for f in leftovers(run_dir))

    assert run(stage2, run_dir, *S2) == 0  # the same command again
    out = capsys.readouterr().out
    assert f"stage 2 top: already finished (400/400 steps) in {run_dir / 'stage2' / 'top'}" in out
    assert f"stage 2 bottom: resuming from {bottom} at step {step}" in out
    assert "extracting" not in out  # the codes of the killed run are reused (same stage-1 checkpoint)
    assert leftovers(run_dir) == []

    straight = copy_run(smoke_run, tmp_path / "straight", parts=("config.yaml", "stage1"))
    assert run(stage2, straight, *S2) == 0
    for level in ("top", "bottom"):
        a = load_checkpoint(run_dir / "stage2" / level / "last.ckpt")
        b = load_checkpoint(straight / "stage2" / level / "last.ckpt")
        print(level, "held-out bits/code: interrupted", a["metrics"]["nll_bits"], "straight", b["metrics"]["nll_bits"])
        assert a["step"] == b["step"] == 400
        assert a["metrics"]["nll_bits"] == pytest.approx(b["metrics"]["nll_bits"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# damaged, stale or planted checkpoints


def one_error_line(err: str) -> str:
    """The user-facing error: exactly one stderr line starting with "error:", and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def stage1_copy(smoke_run, tmp_path):
    shutil.copytree(smoke_run / "stage1", tmp_path / "run" / "stage1")
    return tmp_path / "run"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_last_checkpoint_is_named_and_not_overwritten(stage1_copy, capsys, damage):
    last = stage1_copy / "stage1" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4000), "empty": b""}[damage])
    damaged = last.read_bytes()
    before = sorted(p.name for p in stage1_copy.rglob("*"))
    assert run(stage1, stage1_copy, "stage1.max_steps=30") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"checkpoint {last} is corrupt or truncated" in line and "delete it" in line and "--fresh" in line
    assert last.read_bytes() == damaged  # not overwritten
    assert sorted(p.name for p in stage1_copy.rglob("*")) == before  # nothing written at all


class Planted:
    """A pickle that creates a file when it is loaded (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("target,stage", [("stage1/last.ckpt", "stage1"), ("stage1/best.ckpt", "stage2"),
                                          ("stage2/top/best.ckpt", "sample")])
def test_pickle_planted_as_checkpoint_is_refused_not_executed(smoke_run, tmp_path, capsys, target, stage):
    from stages import sample

    run_dir = tmp_path / "run"
    for part in ("stage1", "codes", "stage2"):
        shutil.copytree(smoke_run / part, run_dir / part)
    marker = tmp_path / "pwned"
    path = run_dir / target
    torch.save({"model": {}, "meta": Planted(marker)}, path)
    with pytest.raises(UserError, match="refused by the safe loader"):
        load_checkpoint(path)
    module = {"stage1": stage1, "stage2": stage2, "sample": sample}[stage]
    assert run(module, run_dir) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"checkpoint {path} was refused by the safe loader (weights_only=True)" in line
    assert not marker.exists()
    assert not (run_dir / "samples").exists() and not (run_dir / "sampler").exists()
    torch.load(path, weights_only=False)  # the unsafe loader runs it: the planted file really is hostile
    assert marker.exists()


def test_no_unsafe_deserialisation_in_the_code_base():
    """Every torch.load / fabric.load passes weights_only=True; no pickle.load, no np.load(allow_pickle=True)."""
    import ast

    problems = []
    for folder in ("pipeline", "stages", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if node.func.attr == "load" and owner in ("torch", "fabric"):
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    if not ok:
                        problems.append(f"{where} {owner}.load without weights_only=True")
                if owner in ("pickle", "cPickle", "dill") and node.func.attr in ("load", "loads"):
                    problems.append(f"{where} {owner}.{node.func.attr}")
                if owner == "np" and node.func.attr == "load":
                    value = kw.get("allow_pickle")
                    if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                        problems.append(f"{where} np.load with allow_pickle")
    assert problems == []
