"""Bad input at the command level: every case exits with code 2 and one "error:" line on stderr, without a
traceback, and leaves no half-written file in the run folder. (The messages themselves are unit-tested in
test_config.py, test_data.py and test_sampler.py; the stage-order checks in test_stages.py.)"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.generate import main as generate
from stages import evaluate, sample, stage1, stage2
from tests.conftest import SMOKE, image_folder, run

ROOT = Path(__file__).resolve().parents[1]


def refused(capsys, code: int, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line starting with "error:" (progress bars of the data loading may come
    before it), no traceback; returns that line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def written(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def half_written(folder: Path) -> list[str]:
    return [f for f in written(folder) if Path(f).name.startswith(".") or f.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------
# config


def test_unknown_key_in_a_real_process_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stages.stage1", "--config", SMOKE, "--run", str(tmp_path / "r"),
                           "stage1.max_stepz=5"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown config key stage1.max_stepz (did you mean max_steps?)")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override,message", [
    ("stage1.max_stepz=5", "unknown config key stage1.max_stepz"),
    ("stage1.max_steps=abc", "stage1.max_steps='abc': expected an integer"),
    ("data.image_size=30", "data.image_size=30 is not allowed: must be divisible"),
    ("vqvae.codebook_size=1", "vqvae.codebook_size=1 is not allowed: must be >= 2"),
])
def test_config_errors_stop_before_any_work(tmp_path, capsys, override, message):
    assert run(stage1, tmp_path / "r", override) == 2
    refused(capsys, 2, message)
    assert not (tmp_path / "r").exists()


def test_devices_that_do_not_exist(tmp_path, capsys):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 CUDA devices")
    code = run(stage1, tmp_path / "r", "fabric.accelerator=cuda", "fabric.devices=2")
    refused(capsys, code, f"fabric.devices=2 but {torch.cuda.device_count()} CUDA device(s) exist",
            "lower fabric.devices")
    assert written(tmp_path / "r") == []


# ---------------------------------------------------------------------------------------------------------
# data




@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_data_folder(tmp_path, capsys, case):
    folder = tmp_path / "images"
    if case == "empty":
        folder.mkdir()
    code = run(stage1, tmp_path / "r", "data.source=folder", f"data.path={folder}")
    refused(capsys, code, f"data.path={folder}", "is not a folder" if case == "missing" else "holds no images")
    assert written(tmp_path / "r") == []


def test_corrupt_image_is_an_error_on_request(tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    code = run(stage1, tmp_path / "r", "data.source=folder", f"data.path={folder}", "data.on_corrupt=error")
    refused(capsys, code, f"cannot read image {folder / 'a' / 'broken.png'}", "data.on_corrupt=skip")
    assert written(tmp_path / "r") == []


def test_corrupt_image_is_skipped_and_counted_by_default(tmp_path, capsys):
    folder = image_folder(tmp_path / "images")
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) \(data.on_corrupt=skip\)"):
        code = run(stage1, tmp_path / "r", "data.source=folder", f"data.path={folder}", "stage1.batch_size=4",
                   "stage1.max_steps=2", "stage1.grid_images=2")
    assert code == 0
    assert "stage 1: 11 train / 1 held-out images" in capsys.readouterr().out  # the 12 good images of 13
    assert half_written(tmp_path / "r") == []


# ---------------------------------------------------------------------------------------------------------
# stages in the wrong order, or fed another stage's files


def partial(smoke_run: Path, dst: Path, *parts: str) -> Path:
    for part in parts:
        shutil.copytree(smoke_run / part, dst / part)
    return dst


def test_sample_before_stage2(smoke_run, tmp_path, capsys):
    run_dir = partial(smoke_run, tmp_path / "r", "stage1")
    refused(capsys, run(sample, run_dir), "no stage-2 checkpoint for the top prior", "make stage2")
    assert written(run_dir / "samples") == [] and written(run_dir / "sampler") == []


def test_evaluate_before_anything(tmp_path, capsys):
    refused(capsys, run(evaluate, tmp_path / "r"), "no samples", "make sample")
    assert written(tmp_path / "r") == []


def test_priors_of_another_stage1_model_are_refused(smoke_run, tmp_path, capsys):
    """Stage 1 retrained (--fresh) under priors fitted to the old codes: sample, evaluate and stage 2 refuse
    them instead of decoding the wrong codes."""
    run_dir = partial(smoke_run, tmp_path / "r", "stage1", "codes", "stage2", "samples")
    assert run(stage1, run_dir, "stage1.max_steps=2", fresh=True) == 0
    capsys.readouterr()
    for module in (sample, evaluate):
        refused(capsys, run(module, run_dir), "prior", "was trained on the codes of another stage-1 model",
                "--fresh")
    assert written(run_dir / "sampler") == [] and written(run_dir / "eval") == []
    refused(capsys, run(stage2, run_dir), "was trained with a different stage-1 model", "--fresh")
    assert half_written(run_dir) == []


@pytest.fixture(scope="module")
def unconditional(smoke_run, tmp_path_factory):
    """Priors trained without class labels (2 steps each) on the smoke run's stage 1."""
    run_dir = partial(smoke_run, tmp_path_factory.mktemp("uncond") / "r", "stage1", "codes")
    assert run(stage2, run_dir, "prior.class_conditional=false", "stage2.max_steps=2") == 0
    return run_dir


@pytest.mark.parametrize("override,message", [
    ("sample.labels=7", "labels were given but this prior is unconditional"),
    ("sample.top_p=1.5", "sample.top_p=1.5 is not allowed: must be in (0, 1]"),
    ("sample.temperature=0", "sample.temperature=0.0 is not allowed: must be > 0"),
    ("sample.top_k=-1", "sample.top_k=-1 is not allowed"),
])
def test_bad_sampling_settings_write_nothing(unconditional, capsys, override, message):
    refused(capsys, run(sample, unconditional, override), message)
    assert written(unconditional / "samples") == [] and written(unconditional / "sampler") == []


def test_label_outside_the_classes(smoke_run, tmp_path, capsys):
    run_dir = partial(smoke_run, tmp_path / "r", "stage1", "codes", "stage2")
    refused(capsys, run(sample, run_dir, "sample.labels=12"), "label 12 is outside the trained classes 0..9")
    assert written(run_dir / "samples") == [] and written(run_dir / "sampler") == []


# ---------------------------------------------------------------------------------------------------------
# the exported sampler's command line (python -m pipeline.generate)


@pytest.fixture(scope="module")
def exported(unconditional, tmp_path_factory):
    """The unconditional run's sampler, exported by the sample stage."""
    assert run(sample, unconditional, "sample.num=4") == 0
    return unconditional / "sampler"


@pytest.mark.parametrize("damage,message", [
    ("missing", "has no model.safetensors"),
    ("tampered", "does not match the sha256 in config.json"),
])
def test_generate_with_a_damaged_sampler_folder(exported, tmp_path, capsys, damage, message):
    folder = tmp_path / "sampler"
    shutil.copytree(exported, folder)
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    out = tmp_path / "out.png"
    refused(capsys, generate(["--sampler", str(folder), "--num", "2", "--out", str(out)]), message)
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--label", "7"], "labels were given but this prior is unconditional"),
    (["--top-p", "1.5"], "top_p=1.5"),
    (["--temperature", "0"], "temperature=0.0"),
])
def test_generate_with_bad_settings(exported, tmp_path, capsys, args, message):
    out = tmp_path / "out.png"
    refused(capsys, generate(["--sampler", str(exported), "--num", "2", "--out", str(out), *args]), message)
    assert not out.exists()
    assert generate(["--sampler", str(exported), "--num", "2", "--out", str(out)]) == 0  # the folder is fine
