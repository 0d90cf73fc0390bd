"""The README's commands work when pasted: every fenced block marked ```bash runnable runs with bash -e in a
scratch copy of the checkout (links to the code, configs and .venv; its own runs/ and weights/). And the help
that the commands print: each stage lists its own config keys, make help prints no stray lines."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINKED = (".venv", "Makefile", "pyproject.toml", "configs", "pipeline", "scripts", "stages", "tests", "README.md")


def runnable_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```bash runnable\n(.*?)^```", text, flags=re.S | re.M)


def scratch_checkout(tmp: Path) -> Path:
    tmp.mkdir()
    for name in LINKED:
        (tmp / name).symlink_to(ROOT / name)
    return tmp


def test_readme_has_runnable_blocks():
    blocks = runnable_blocks()
    assert len(blocks) >= 2 and any("make stage1" in b for b in blocks) and any("fid-helper" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_block_runs(tmp_path, index):
    block = runnable_blocks()[index]
    cwd = scratch_checkout(tmp_path / "checkout")
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{block}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("stage,own,others", [
    ("data", ["data.holdout_split", "data.hflip", "data.num_proc"], ["vqvae.", "stage1.", "prior.", "--fresh"]),
    ("stage1", ["data.path", "vqvae.codebook_size", "stage1.max_steps", "fabric.devices"], ["prior.", "sample."]),
    ("stage2", ["prior.top.kind", "prior.top.kernel_size", "extract.shard_size"], ["vqvae.", "sample.num", "data."]),
    ("sample", ["sample.guidance", "sample.grid_images"], ["stage1.", "prior.", "--fresh"]),
    ("evaluate", ["evaluate.extractor"], ["stage2.", "--fresh", "sample.num"]),
    ("sweep", ["sweep.top_p", "sample.top_k", "evaluate.k"], ["--fresh", "vqvae."]),
])
def test_stage_help_lists_its_own_keys(stage, own, others):
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"usage: python -m stages.{stage}")
    for key in own:
        assert key in proc.stdout, key
    for key in others:
        assert key not in proc.stdout, key
    assert ("--fresh" in proc.stdout) == (stage in ("stage1", "stage2"))
    # every key comes with its type and default
    assert re.search(r"\(int, default \d+\)", proc.stdout)


def test_make_help_prints_the_variables_and_targets_only():
    proc = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("One-command runs.") and lines[-1].startswith("targets: install emoji-data data stage1")
    assert not any("?=" in line or ":=" in line or line.startswith("#") for line in lines), proc.stdout
