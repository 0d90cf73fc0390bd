"""Streaming stage 1 from an image folder: the per-rank shard sampler and its saved position, files decoded on
access exactly as decoding up front does, the same held-out split, unreadable files, augmentation that does not
depend on the worker; and with 2 processes (the real command, Fabric's launcher): disjoint shards that cover the
training files, no decoding of the folder before step 1, and exact resume after Ctrl-C."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import streaming
from pipeline.config import DataConfig
from pipeline.data import load_image_data
from pipeline.io import UserError, load_checkpoint
from pipeline.streaming import StreamedTraining, UnreadableImage, load_stream_data, stream_listing
from pipeline.training import ShardSampler, _identity
from tests.conftest import SMOKE, rounding_tolerance
from tests.stream_helper import png_folder

ROOT = Path(__file__).resolve().parents[1]


def folder_cfg(path, **kw) -> DataConfig:
    return DataConfig(**{"source": "folder", "path": str(path), "image_size": 16, "streaming": "always", **kw})


# ---------------------------------------------------------------------------------------------------------
# the shard sampler


def epoch_items(sampler: ShardSampler, epoch: int) -> list[int]:
    it = iter(ShardSampler(sampler.n, sampler.batch_size, sampler.seed, sampler.rank, sampler.world))
    batches = [next(it) for _ in range((epoch + 1) * sampler.per_epoch)][epoch * sampler.per_epoch :]
    assert all(e == epoch for b in batches for _, e in b)
    return [i for b in batches for i, _ in b]


@pytest.mark.parametrize("n,batch,world", [(96, 8, 2), (103, 5, 2), (50, 4, 3)])
def test_shards_are_disjoint_fixed_and_reshuffled_every_epoch(n, batch, world):
    samplers = [ShardSampler(n, batch, seed=7, rank=r, world=world) for r in range(world)]
    shards = [set(s.shard.tolist()) for s in samplers]
    assert all(len(s) == n // world for s in shards)  # equal shares: every rank takes as many steps
    assert len(set().union(*shards)) == world * (n // world)  # disjoint
    for s, shard in zip(samplers, shards):
        first, second = epoch_items(s, 0), epoch_items(s, 1)
        assert set(first) <= shard and set(second) <= shard  # a rank reads only its own files, every epoch
        assert len(set(first)) == len(first) == s.per_epoch * batch  # each once; only the partial batch dropped
        assert first != second  # reshuffled
    assert ShardSampler(n, batch, seed=8).shard.tolist() != ShardSampler(n, batch, seed=7).shard.tolist()


@pytest.mark.parametrize("taken", [0, 3, 11, 12, 25])
def test_shard_sampler_resumes_from_its_saved_position(taken):
    n, batch, world = 100, 8, 2  # 6 batches per rank per epoch: positions cross epoch boundaries
    for rank in range(world):
        it = iter(ShardSampler(n, batch, seed=1, rank=rank, world=world))
        whole = [next(it) for _ in range(taken + 8)]
        running = ShardSampler(n, batch, seed=1, rank=rank, world=world)
        ahead = iter(running)
        for _ in range(taken + 4):  # a loader prefetches beyond what the loop took: only advance() moves it
            next(ahead)
        for _ in range(taken):
            running.advance()
        state = running.state_dict()
        assert (state["epoch"], state["offset"]) == divmod(taken, 6)
        resumed = ShardSampler(n, batch, seed=99, rank=rank, world=world)  # the saved seed wins
        assert resumed.load_state_dict(state) == ""
        it = iter(resumed)
        assert [next(it) for _ in range(8)] == whole[taken:]


def test_shard_sampler_after_a_change_of_process_count_keeps_the_epoch_and_says_so():
    saved = ShardSampler(96, 8, seed=1, rank=0, world=2)
    for _ in range(9):  # 6 batches per epoch: epoch 1, half way
        saved.advance()
    resumed = ShardSampler(96, 8, seed=1, rank=0, world=1)
    note = resumed.load_state_dict(saved.state_dict())
    assert "world 2 -> 1" in note and "another order" in note
    assert (resumed.epoch, resumed.offset) == (1, 6)  # half of the 12 batches of a 1-process epoch
    with pytest.raises(UserError, match="larger than the 10 training images"):
        ShardSampler(10, 8, seed=0, world=2)


# ---------------------------------------------------------------------------------------------------------
# files decoded on access


@pytest.mark.parametrize("layout", ["carve-out", "own val split"])
def test_streamed_split_and_pixels_equal_decoding_up_front(tmp_path, layout):
    if layout == "carve-out":
        root = png_folder(tmp_path / "imgs", 40)
    else:
        png_folder(tmp_path / "imgs" / "train", 30)
        png_folder(tmp_path / "imgs" / "val", 10)
        root = tmp_path / "imgs"
    cfg = folder_cfg(root, holdout_fraction=0.2, max_images=36, split_seed=3)
    listed = stream_listing(cfg)
    streamed, decoded = load_stream_data(cfg, listed), load_image_data(cfg)
    for part in ("train", "holdout"):
        a, b = getattr(streamed, part), getattr(decoded, part)
        assert len(a) == len(b) > 0
        assert torch.equal(a.all_pixels(), b.all_pixels())  # the same files, decoded alike (integers: exact)
        assert torch.equal(a.labels, b.labels)
    assert streamed.class_names == decoded.class_names == ["a", "b"]
    assert streamed.holdout_source.startswith(decoded.holdout_source)


def test_auto_streams_only_above_the_in_memory_size(tmp_path, monkeypatch):
    root = png_folder(tmp_path / "imgs", 20)
    assert stream_listing(folder_cfg(root, streaming="auto")) is None  # 20 x 256 bytes: in memory
    assert stream_listing(folder_cfg(root, streaming="never")) is None
    assert stream_listing(DataConfig(streaming="auto")) is None  # the embedded digits
    monkeypatch.setattr(streaming, "IN_MEMORY_BYTES", 20 * 256)
    listed = stream_listing(folder_cfg(root, streaming="auto"))
    assert listed is not None and len(listed.files["train"]) == 20
    assert stream_listing(folder_cfg(root, streaming="auto", max_images=19)) is None


def test_unreadable_files_are_replaced_or_stop_with_one_line_from_a_worker(tmp_path):
    root = png_folder(tmp_path / "imgs", 12)
    cfg = folder_cfg(root, holdout_fraction=0.2)
    data = load_stream_data(cfg, stream_listing(cfg))
    bad = Path(os.fsdecode(data.train.paths[2]))
    bad.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=f"skipped unreadable image {bad}"):
        pixels, labels = data.train.__getitems__([1, 2])
    nxt, _ = data.train.__getitems__([3])
    assert torch.equal(pixels[1], nxt[0]) and labels[1] == data.train.labels[3]  # the next file in its place
    strict = load_stream_data(folder_cfg(root, holdout_fraction=0.2, on_corrupt="error"), stream_listing(cfg))
    loader = DataLoader(StreamedTraining(strict.train, False, 1.0, seed=0), batch_sampler=[[(2, 0)]],
                        collate_fn=_identity, num_workers=1)
    with pytest.raises(UnreadableImage) as err:
        next(iter(loader))
    assert str(err.value) == (f"cannot read image {bad}: cannot identify image file '{bad}'; fix or remove it, or "
                              "set data.on_corrupt=skip")


def test_augmentation_does_not_depend_on_the_worker(tmp_path):
    root = png_folder(tmp_path / "imgs", 40)
    cfg = folder_cfg(root)
    train = StreamedTraining(load_stream_data(cfg, stream_listing(cfg)).train, True, 0.5, seed=5)
    sampler = ShardSampler(len(train), 4, seed=0)

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=_identity, num_workers=workers)
        it = iter(loader)
        return [next(it)[0] for _ in range(5)]

    one, two = batches(0), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(one, two))  # the same arithmetic in any process: exact
    plain = to_plain(train, sampler)
    assert not torch.equal(one[0], plain)  # augmented
    assert one[0].min() >= -1 and one[0].max() <= 1


def to_plain(train: StreamedTraining, sampler: ShardSampler) -> torch.Tensor:
    from pipeline.data import to_float

    return to_float(train.images.__getitems__([i for i, _ in next(iter(sampler))])[0])


# ---------------------------------------------------------------------------------------------------------
# stage 1 with 2 processes (Fabric's launcher starts the second), recording every decoded file

N_FILES, BATCH = 2000, 64  # 1800 training files: 14 steps of 2 x 64 are one epoch
STREAM = ["fabric.devices=2", "data.source=folder", "data.streaming=always", "data.num_workers=2", "data.max_images=0",
          "data.hflip=true", "data.crop_scale=0.8", f"stage1.batch_size={BATCH}", "stage1.max_steps=14",
          "stage1.checkpoint_every=100", "stage1.eval_every=100"]


def stage1_recorded(log: Path, run_dir: Path, folder: Path, stop_at: int = -1) -> subprocess.CompletedProcess:
    return recorded_command(log, run_dir, [*STREAM, f"data.path={folder}"], stop_at, ranks_at_once=2)


def recorded_command(log: Path, run_dir: Path, overrides: list[str], stop_at: int = -1,
                     ranks_at_once: int = 0) -> subprocess.CompletedProcess:
    """tests.stream_helper's stage 1 with ``overrides`` in a clean environment. Fabric's launcher starts the ranks:
    rank 0 starts rank 1 once it has imported everything, and rank 1 then imports it all again while rank 0 waits
    (about half of a launch's time). With ``ranks_at_once`` (the fabric.devices of ``overrides``) this function
    starts every rank itself, at once, with the environment Fabric's launcher gives the ranks it starts; the
    result is rank 0's, its stderr followed by the other ranks' and its return code the first non-zero one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "NODE_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "tests.stream_helper", str(log), str(stop_at), "--", "--config", SMOKE, "--run",
           str(run_dir), *overrides]
    if not ranks_at_once:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0", WORLD_SIZE=str(ranks_at_once))
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(ranks_at_once)]
    outs = [p.communicate(timeout=300) for p in procs]
    code = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(cmd, code, outs[0][0], "".join(err for _, err in outs))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decoded_files(log: Path, who: str) -> list[str]:
    return [line for p in sorted(log.glob(f"{who}-*.txt")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def streamed_runs(tmp_path_factory):
    """Stage 1 streamed for one epoch with 2 processes, straight; and the same run stopped by Ctrl-C in step 5,
    then resumed."""
    base = tmp_path_factory.mktemp("stream")
    folder = png_folder(base / "imgs", N_FILES)
    straight = stage1_recorded(base / "log", base / "straight", folder)
    stopped = stage1_recorded(base / "log-stopped", base / "stopped", folder, stop_at=5)
    stopped_at = load_checkpoint(base / "stopped" / "stage1" / "last.ckpt")["step"]
    resumed = stage1_recorded(base / "log-resumed", base / "stopped", folder)
    return base, folder, straight, (stopped, stopped_at, resumed)


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_that_cover_the_training_files(streamed_runs):
    base, folder, straight, _ = streamed_runs
    assert straight.returncode == 0, straight.stderr[-3000:]
    cfg = folder_cfg(folder, max_images=0)
    data = load_stream_data(cfg, stream_listing(cfg))
    train = {os.fsdecode(p) for p in data.train.paths}
    ranks = [set(decoded_files(base / "log", f"rank{r}-worker")) for r in range(2)]
    assert not ranks[0] & ranks[1]  # no file read by both ranks (prefetching into epoch 2 included)
    assert ranks[0] | ranks[1] <= train  # no held-out file trained on
    assert len(ranks[0] | ranks[1]) >= 14 * 2 * BATCH == len(train) - 8  # one epoch: all but the partial batches
    assert not (base / "straight" / "data" / "cache").exists()  # nothing decoded up front


@pytest.mark.slow
def test_start_up_does_not_decode_the_folder(streamed_runs):
    base, _, straight, _ = streamed_runs
    assert straight.returncode == 0
    first = [json.loads((base / "log" / f"rank{r}.json").read_text()) for r in range(2)]
    prefetch = 2 * 2 * BATCH  # 2 workers x 2 batches each
    preview = 40 * 12  # the data preview (rank 0 only): the first images, for 12 per class
    assert first[0]["setup"] <= preview and first[0]["own"] <= prefetch + BATCH and first[1]["own"] <= prefetch + BATCH
    assert first[0]["setup"] + first[0]["own"] + first[1]["own"] < N_FILES // 2


@pytest.mark.slow
def test_streamed_resume_after_ctrl_c_ends_with_the_straight_weights(streamed_runs):
    base, _, straight, (stopped, stopped_at, resumed) = streamed_runs
    assert stopped.returncode == 130 and resumed.returncode == 0, (stopped.stderr[-2000:], resumed.stderr[-2000:])
    assert stopped_at == 6 and "resuming from" in resumed.stdout
    a = load_checkpoint(base / "straight" / "stage1" / "last.ckpt")
    b = load_checkpoint(base / "stopped" / "stage1" / "last.ckpt")
    assert a["step"] == b["step"] == 14
    assert a["data"] == b["data"] == {"epoch": 1, "offset": 0, "seed": 0, "n": 1800, "world": 2, "batch_size": 64}
    for key, value in a["model"].items():
        if value.is_floating_point():
            assert (value - b["model"][key]).abs().max() <= rounding_tolerance(value), key
        else:
            assert torch.equal(value, b["model"][key]), key


def test_stage1_streamed_stops_on_an_unreadable_file_with_one_line(tmp_path, capsys, monkeypatch):
    """data.on_corrupt=error: the DataLoader worker's error reaches the user as the one ``error:`` line, no
    traceback (the data report, which would decode the first images in this process, is left out)."""
    from stages import stage1
    from tests.conftest import run

    monkeypatch.setattr(stage1, "write_data_report", lambda *a: None)
    root = png_folder(tmp_path / "imgs", 40)
    for p in sorted(root.rglob("*.png")):
        p.write_bytes(b"not an image")  # every file: whichever the first batch draws
    code = run(stage1, tmp_path / "run", "data.source=folder", f"data.path={root}", "data.streaming=always",
               "data.num_workers=1", "data.on_corrupt=error", "data.max_images=0", "stage1.batch_size=4",
               "stage1.max_steps=2", "prior.class_conditional=false", "stage1.grid_images=0")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and line[0].startswith(f"error: cannot read image {root}/") and \
        line[0].endswith("; fix or remove it, or set data.on_corrupt=skip")
