"""Every failure a user can cause, run as the real command in a subprocess: a non-zero exit, stderr holding one
line that starts with "error:" (besides progress bars), no traceback, and every file the run folder held before
byte-identical afterwards. Each row is also a row of the README's bad-input table."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SMOKE, bomb_png, copy_run, image_folder

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^[^:]*:\s*\d+%\|| examples/s\]$| it/s\]$|\d+ examples \[")  # tqdm lines


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


def command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def stage(name: str, run_dir: Path, *overrides: str) -> list[str]:
    return command(f"stages.{name}", "--config", SMOKE, "--run", str(run_dir), *overrides)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def assert_refused(returncode: int, stderr: str, *fragments: str) -> str:
    """Non-zero exit; stderr is one "error:" line once tqdm's progress lines are set aside; no traceback."""
    lines = [part.strip() for line in stderr.splitlines() for part in line.split("\r") if part.strip()]
    lines = [line for line in lines if not PROGRESS.search(line)]
    assert returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_kept(before: dict[str, str], after: dict[str, str]) -> None:
    """Every earlier file byte-identical, and no temporary file left behind."""
    assert {k: after.get(k) for k in before} == before
    assert [k for k in after if Path(k).name.startswith(".") or k.endswith(".tmp")] == []


def refused(cmd: list[str], folder: Path, *fragments: str, **extra_env: str) -> str:
    before = snapshot(folder)
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=600)
    line = assert_refused(proc.returncode, proc.stderr, *fragments)
    assert_kept(before, snapshot(folder))
    return line


@pytest.fixture(scope="module")
def finished(smoke_run, tmp_path_factory) -> Path:
    """A finished smoke run (stages 1, 2 and sample, sampler exported): copy it before use."""
    return copy_run(smoke_run, tmp_path_factory.mktemp("finished") / "run")






# ---------------------------------------------------------------------------------------------------------
# one row each: (what, command builder, fragments of the error line)


def _edited_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["vqvae"]["code_dim"] *= 2  # the weights beside it keep the old shapes
    (folder / "config.json").write_text(json.dumps(config))


ROWS = {
    "sample.seed=-1": (lambda r: stage("sample", r, "sample.seed=-1"), ["sample.seed=-1 is not allowed", ">= 0"]),
    "stage1.seed=-1": (lambda r: stage("stage1", r, "stage1.seed=-1"), ["stage1.seed=-1 is not allowed"]),
    "sample.grid_images=-1": (lambda r: stage("sample", r, "sample.grid_images=-1"),
                              ["sample.grid_images=-1 is not allowed", "0 = no grid"]),
    "stage1.grid_images=-1": (lambda r: stage("stage1", r, "stage1.grid_images=-1"),
                              ["stage1.grid_images=-1 is not allowed"]),
    "sample.guidance=inf": (lambda r: stage("sample", r, "sample.guidance=inf"),
                            ["sample.guidance=inf:", "finite number"]),
    "sample.temperature=nan": (lambda r: stage("sample", r, "sample.temperature=nan"),
                               ["sample.temperature=nan:", "finite number"]),
    "sample.top_p=inf": (lambda r: stage("sample", r, "sample.top_p=.inf"), ["sample.top_p=inf", "finite number"]),
    "sample.kv_cache=paged": (lambda r: stage("sample", r, "sample.kv_cache=paged"),
                              ["sample.kv_cache='paged' is not allowed", "choose one of dynamic, static"]),
    "sample.compile=true": (lambda r: stage("sample", r, "sample.compile=true"),
                            ["sample.compile=True is not allowed", "needs sample.kv_cache=static"]),
    "generate --num 0": (lambda r: command("pipeline.generate", "--sampler", str(r / "sampler"), "--num", "0",
                                           "--out", str(r / "samples" / "grid.png")), ["--num 0", ">= 1"]),
    "generate --guidance inf": (lambda r: command("pipeline.generate", "--sampler", str(r / "sampler"), "--num", "2",
                                                  "--guidance", "inf", "--out", str(r / "samples" / "grid.png")),
                                ["guidance=inf", "finite"]),
    "generate --device cuda": (lambda r: command("pipeline.generate", "--sampler", str(r / "sampler"), "--num", "2",
                                                 "--device", "cuda:7", "--out", str(r / "samples" / "grid.png")),
                               ["device 'cuda:7' does not exist here", "--device cpu"]),
    "generate --device nonsense": (lambda r: command("pipeline.generate", "--sampler", str(r / "sampler"), "--num",
                                                     "2", "--device", "gpu0", "--out", str(r / "x.png")),
                                   ["device 'gpu0' is not a device name"]),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_and_keeps_every_file(finished, tmp_path, row):
    run_dir = copy_run(finished, tmp_path / "run")
    build, fragments = ROWS[row]
    refused(build(run_dir), run_dir, *fragments)


def test_sampler_config_edited_to_other_shapes(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    _edited_config(run_dir / "sampler")
    refused(command("pipeline.generate", "--sampler", str(run_dir / "sampler"), "--num", "2", "--out",
                    str(run_dir / "samples" / "grid.png")),
            run_dir, "config.json does not describe the weights beside it", "export it again")


def test_decompression_bomb_in_a_folder_dataset(tmp_path):
    folder = image_folder(tmp_path / "images")
    bomb = bomb_png(folder / "a" / "bomb.png")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("a file the user keeps here")
    refused(stage("stage1", run_dir, "data.source=folder", f"data.path={folder}", "data.on_corrupt=error"), run_dir,
            f"cannot read image {bomb}", "decompression bomb", "data.on_corrupt=skip")
    # skipped and counted by default, like any unreadable image
    proc = subprocess.run(stage("stage1", run_dir, "data.source=folder", f"data.path={folder}", "stage1.max_steps=2",
                                "stage1.batch_size=4", "stage1.grid_images=0"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable image(s)" in proc.stderr and "11 train / 1 held-out" in proc.stdout
    assert not (run_dir / "stage1" / "reconstructions.png").exists()  # grid_images=0: no grid


# ---------------------------------------------------------------------------------------------------------
# the operating system says no: a read-only run folder, a full disk


def _namespace() -> list[str] | None:
    """A private mount namespace to mount in: ``unshare -m`` as root, ``unshare -rm`` (user namespace) else."""
    cmd = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    try:
        probe = subprocess.run([*cmd, "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cmd if probe.returncode == 0 else None


def on_file_system(mode: str, src: Path, dst: Path, result: Path, cmd: list[str]) -> dict:
    ns = _namespace()
    if ns is None:
        pytest.skip("no mount namespace here (unshare -m / -rm refused): cannot make a full or read-only disk")
    helper = [*ns, sys.executable, "-m", "tests.fs_helper", mode, str(src), str(dst), str(result), "--", *cmd]
    subprocess.run(helper, cwd=ROOT, env=env(), check=True, timeout=900)
    return json.loads(result.read_text())


@pytest.mark.parametrize("mode,fragments", [
    ("readonly", ["cannot write", ".lock: Read-only file system", "choose a writable folder"]),
    ("full", ["cannot write", "No space left on device", "free some space"]),
])
def test_read_only_folder_or_full_disk(finished, tmp_path, mode, fragments):
    """Stage 2 on a run folder holding stage 1: read-only, it stops at its first file (the lock); on a full disk
    when a checkpoint or code shard does not fit. Either way one line, and stage 1's files as they were."""
    src = copy_run(finished, tmp_path / "src", parts=("config.yaml", "stage1"))
    dst = tmp_path / "mounted"
    out = on_file_system(mode, src, dst, tmp_path / "result.json", stage("stage2", dst))
    assert_refused(out["returncode"], out["stderr"], *fragments)
    assert out["before"] and set(out["before"]) == set(snapshot(src))
    assert_kept(out["before"], out["after"])


# ---------------------------------------------------------------------------------------------------------
# two commands on one run folder


def wait_for_lock(proc: subprocess.Popen, lock: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not (lock.exists() and f'"pid": {proc.pid}' in lock.read_text()):
        assert proc.poll() is None, "the first run ended early"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def test_second_run_on_the_same_folder_is_refused_and_a_dead_holder_is_taken_over(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run", parts=("config.yaml", "stage1"))
    # the first: a long stage 1 that resumes and checkpoints only at its end
    first = subprocess.Popen(stage("stage1", run_dir, "stage1.max_steps=100000", "stage1.checkpoint_every=100000",
                                   "stage1.eval_every=100000"),
                             cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock(first, run_dir / ".lock")
        checkpoints = {k: v for k, v in snapshot(run_dir).items() if k.endswith(".ckpt")}
        second = subprocess.run(stage("stage1", run_dir), cwd=ROOT, env=env(), capture_output=True, text=True,
                                timeout=600)
        assert_refused(second.returncode, second.stderr, f"run folder {run_dir} is in use by process {first.pid}",
                       "stages.stage1", "wait for it to finish or stop it")
        # the first run writes its config and logs meanwhile, but no checkpoint: those must be untouched
        assert {k: v for k, v in snapshot(run_dir).items() if k.endswith(".ckpt")} == checkpoints
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the lock file stays, the lock itself goes with the process
        first.wait()
    assert (run_dir / ".lock").exists()
    proc = subprocess.run(stage("stage1", run_dir), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: took over the lock of run folder {run_dir} from process {first.pid}" in proc.stderr
    assert not (run_dir / ".lock").exists()


# ---------------------------------------------------------------------------------------------------------
# paths: ~ and spaces


def test_home_in_data_path_and_spaces_in_paths_through_make(tmp_path):
    home = tmp_path / "home"
    image_folder(home / "images")
    config = tmp_path / "my presets" / "smoke copy.yaml"
    config.parent.mkdir()
    shutil.copy(ROOT / SMOKE, config)
    run_dir = tmp_path / "my runs" / "first try"
    proc = subprocess.run(["make", "--no-print-directory", "stage1", f"CONFIG={config}", f"RUN={run_dir}",
                           "ARGS=data.source=folder data.path=~/images stage1.max_steps=2 stage1.batch_size=4"],
                          cwd=ROOT, env=env(HOME=str(home)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stage 1: 11 train / 1 held-out images" in proc.stdout
    assert (run_dir / "stage1" / "last.ckpt").is_file()
