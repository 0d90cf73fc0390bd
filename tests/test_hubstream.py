"""Streaming stage 1 from a Hub dataset (data.source=hub, data.streaming=always), offline on a local copy laid out as
the Hub lays one out (parquet shards): readers resume mid-block exactly; with 2 processes (both started at once) the
ranks read disjoint parts that cover the training split and a run stopped by Ctrl-C and resumed ends with the
weights of one that ran straight; stage 2 reads the run without decoding into RUN/data/cache; bad values are one
line."""

import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import hubstream
from pipeline.config import DataConfig
from pipeline.hubstream import load_hub_stream
from pipeline.io import load_checkpoint
from pipeline.training import _identity
from stages import stage1, stage2
from tests.conftest import rounding_tolerance, run
from tests.stream_helper import parquet_dataset, private_datasets_cache
from tests.test_streaming import decoded_files, recorded_command

N_TRAIN, SHARDS, N_TEST, BATCH = 96, 4, 16, 8  # per rank 48 examples, per reader (2 workers) 24: 3 batches


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The local dataset; offline and a private datasets cache for this module. The subprocesses read both from
    the environment; ``datasets`` in this process read it when first imported (maybe by an earlier test module), so
    its config is set too: stage 2 here writes the map-style copy into the cache, never ~/.cache/huggingface."""
    base = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as env:
        private_datasets_cache(env, base / "hf")
        yield parquet_dataset(base / "repo", N_TRAIN, SHARDS, N_TEST)


def hub_cfg(repo, **kw) -> DataConfig:
    return DataConfig(**{"source": "hub", "name": str(repo), "image_size": 16, "streaming": "always",
                         "hflip": True, "crop_scale": 0.8, **kw})


def taken(stream, loader_workers: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(stream, batch_size=None, collate_fn=_identity, num_workers=loader_workers)
    it = iter(loader)
    return [stream.take(next(it)) for _ in range(n)]


def test_a_reader_resumes_mid_block_and_across_epochs_exactly(repo, monkeypatch):
    """Blocks of 5 examples: positions fall inside blocks, at their ends and in the next epoch."""
    monkeypatch.setattr(hubstream, "SHUFFLE_BLOCK", 5)
    data = load_hub_stream(hub_cfg(repo))
    straight = taken(data.train.for_rank(0, 2, BATCH, 3, workers=2), 2, 9)  # 9 batches: each reader in epoch 2
    stopped = data.train.for_rank(0, 2, BATCH, 3, workers=2)
    taken(stopped, 2, 5)
    resumed = data.train.for_rank(0, 2, BATCH, 3, workers=2)
    assert resumed.load_state_dict({"ranks": [stopped.state_dict(), {}]}) == ""
    again = taken(resumed, 2, 4)
    for (x, y), (x2, y2) in zip(straight[5:], again):  # the same decoding and augmentation arithmetic: exact
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(straight[0][0], straight[3][0])
    other = data.train.for_rank(0, 1, BATCH, 3, workers=2)
    assert "world 2 -> 1" in other.load_state_dict({"ranks": [stopped.state_dict(), {}]})


@pytest.fixture(scope="module")
def hub_runs(repo, tmp_path_factory):
    """Stage 1 streamed with 2 processes x 2 workers for 8 steps, straight; and stopped by Ctrl-C in step 3, then
    resumed. Both ranks start at once (tests/test_streaming.py runs Fabric's launcher, which starts rank 1 only
    after rank 0 has imported everything)."""
    base = tmp_path_factory.mktemp("hubruns")
    args = ["fabric.devices=2", "data.source=hub", f"data.name={repo}", "data.image_size=16", "data.streaming=always",
            "data.num_workers=2", "data.max_images=0", "data.hflip=true", f"stage1.batch_size={BATCH}",
            "stage1.max_steps=8", "stage1.checkpoint_every=100", "stage1.eval_every=100", "stage1.grid_images=4"]
    straight = recorded_command(base / "log", base / "straight", args, ranks_at_once=2)
    stopped = recorded_command(base / "log-stopped", base / "stopped", args, stop_at=3, ranks_at_once=2)
    resumed = recorded_command(base / "log-resumed", base / "stopped", args, ranks_at_once=2)
    return base, straight, stopped, resumed


@pytest.mark.slow
def test_two_processes_read_disjoint_parts_that_cover_the_training_split(hub_runs):
    base, straight, _, _ = hub_runs
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert (base / "straight" / "stage1" / "last.ckpt").is_file() and (base / "straight" / "data" / "preview.png")
    ranks = [set(decoded_files(base / "log", f"rank{r}-worker")) for r in range(2)]
    assert not ranks[0] & ranks[1]  # no example read by both ranks
    assert ranks[0] | ranks[1] == {f"train-{i}.png" for i in range(N_TRAIN)}  # 8 steps x 2 x 8 > one epoch
    assert not (base / "straight" / "data" / "cache").exists()


@pytest.mark.slow
def test_streamed_hub_resume_after_ctrl_c_ends_with_the_straight_weights(hub_runs):
    base, straight, stopped, resumed = hub_runs
    assert stopped.returncode == 130 and resumed.returncode == 0, (stopped.stderr[-2000:], resumed.stderr[-2000:])
    assert "resuming from" in resumed.stdout and "starts over" not in resumed.stdout
    a = load_checkpoint(base / "straight" / "stage1" / "last.ckpt")
    b = load_checkpoint(base / "stopped" / "stage1" / "last.ckpt")
    assert a["step"] == b["step"] == 8 and a["data"] == b["data"]
    for key, value in a["model"].items():
        if value.is_floating_point():  # other processes, batch shapes alike: within rounding
            assert (value - b["model"][key]).abs().max() <= rounding_tolerance(value), key
        else:
            assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
def test_stage2_reads_a_streamed_hub_run_without_a_data_cache(repo, hub_runs, tmp_path):
    base, straight, _, _ = hub_runs
    assert straight.returncode == 0
    run_dir = shutil.copytree(base / "straight", tmp_path / "run")
    assert run(stage2, run_dir, "stage2.max_steps=2", "stage2.batch_size=8", "extract.batch_size=32") == 0
    splits = json.loads((run_dir / "codes" / "manifest.json").read_text())["splits"]
    assert (splits["train"]["n"], splits["holdout"]["n"]) == (N_TRAIN, N_TEST)  # every training image, map-style
    assert not (run_dir / "data" / "cache").exists()
    assert list((repo.parent / "hf" / "datasets").rglob("*.arrow"))  # the map-style copy: this module's cache


@pytest.mark.parametrize("overrides,message", [
    (["data.source=idx", "data.path=/nowhere"], "error: data.streaming='always' is not allowed: streams only from "
                                                "an image folder or a Hub dataset"),
    (["data.source=hub", "data.name={missing}"], "error: could not load data.name={missing} split=train"),
    (["data.source=hub", "data.name={repo}", "data.holdout_split=none"], "error: data.streaming=always: {repo} has "
                                                                          "no held-out split of its own"),
])
def test_bad_streamed_hub_values_are_one_line(repo, tmp_path, capsys, overrides, message):
    fill = {"missing": str(tmp_path / "missing"), "repo": str(repo)}
    code = run(stage1, tmp_path / "run", "data.streaming=always", "data.max_images=0",
               *(o.format(**fill) for o in overrides))
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(message.format(**fill)), err[-500:]
