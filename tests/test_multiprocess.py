"""Multi-process runs on CPU (2 processes, gloo): data sharding, identical weights and codebooks on every rank,
rank-0-only files, checkpoints that move between process counts, and stage 2 / sample / evaluate with
fabric.devices=2 giving the 1-process results.

The stage commands run as real subprocesses: stage 1 as ``python -m stages.stage1 ... fabric.devices=2``
(Fabric's launcher starts the second process), stage 2, sample and evaluate under
``python -m torch.distributed.run`` (torchrun starts both, as on clusters). tests/mp_helper.py also runs under
torchrun, to look inside both ranks.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.codes import CodeSet, extract_codes
from pipeline.config import FabricConfig
from pipeline.data import load_image_data
from pipeline.distributed import on_rank_zero, rank_zero_first
from pipeline.fabric import make_fabric
from pipeline.io import UserError, load_checkpoint
from pipeline.samples import load_sample_set
from pipeline.training import StepSampler
from stages import evaluate, sample, stage1
from stages.runfolder import RunFolder, load_vqvae
from tests.conftest import SMOKE, assert_same_images, copy_run, run

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "NODE_RANK", "TORCHELASTIC_RUN_ID", "LT_CLI_USED", "DEBUG")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_cmd(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return proc


def torchrun_stage(stage: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The stage command as cluster users start it: torchrun starts both processes (in parallel)."""
    return run_cmd(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", f"stages.{stage}",
                    "--config", SMOKE, "--run-dir", str(run_dir), "fabric.devices=2", *overrides])


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def leftovers(folder: Path) -> list[str]:
    return [f for f in files(folder) if Path(f).name.startswith(".") or f.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------
# data sharding (unit)


@pytest.mark.parametrize("n,batch,world", [(96, 8, 2), (103, 5, 2), (50, 4, 3), (40, 8, 1)])
def test_step_sampler_ranks_are_disjoint_and_cover_the_epoch(n, batch, world):
    samplers = [StepSampler(n, batch, seed=7, rank=r, world=world) for r in range(world)]
    per_epoch = samplers[0].per_epoch
    assert per_epoch == (n // world) // batch
    for epoch in range(2):
        seen = []
        for s in samplers:
            it = iter(s)
            for _ in range(epoch * per_epoch):  # skip to this epoch
                next(it)
            batches = [next(it) for _ in range(per_epoch)]
            assert all(len(b) == batch for b in batches)
            seen.append([i for b in batches for i in b])
        flat = [i for rank_items in seen for i in rank_items]
        assert len(flat) == len(set(flat))  # no index on two ranks, none twice on one rank
        assert set(flat) <= set(range(n))
        assert n - len(flat) < world * batch + world  # only the partial batches are dropped
        if n % (world * batch) == 0:
            assert sorted(flat) == list(range(n))  # the union is everything
    # each epoch is a new permutation
    assert next(iter(samplers[0])) != next(iter(StepSampler(n, batch, 7, 0, world, start=per_epoch)))


@pytest.mark.parametrize("start", [0, 3, 11, 12, 25])
def test_step_sampler_resumes_at_a_step_with_the_same_batches(start):
    n, batch, world = 100, 8, 2  # 6 batches per rank per epoch: starts cross epoch boundaries
    for rank in range(world):
        it = iter(StepSampler(n, batch, seed=1, rank=rank, world=world))
        whole = [next(it) for _ in range(start + 10)]
        it = iter(StepSampler(n, batch, seed=1, rank=rank, world=world, start=start))
        assert [next(it) for _ in range(10)] == whole[start:]


def test_step_sampler_depends_on_seed_and_refuses_too_big_batches():
    a = next(iter(StepSampler(100, 8, seed=0)))
    b = next(iter(StepSampler(100, 8, seed=1)))
    assert a != b
    with pytest.raises(UserError, match="larger than the 10 training images"):
        StepSampler(10, 8, seed=0, world=2)


def test_fabric_refuses_fewer_devices_than_torchrun_started(monkeypatch):
    """Under torchrun a Fabric with devices=1 would make every process a lone rank 0 writing the same files."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"torchrun started 4 process\(es\) \(2 per node\).*"
                                        r"set fabric.devices=2 fabric.num_nodes=2"):
        make_fabric(FabricConfig(devices=1, precision="32-true"))


def test_cuda_devices_that_do_not_exist_are_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=r"fabric.devices=2 but 0 CUDA device\(s\) exist"):
        make_fabric(FabricConfig(accelerator="cuda", devices=2))


@pytest.mark.parametrize("fails", [False, True])
def test_a_stage_destroys_its_process_group_on_the_way_out(tmp_path, fails):
    """A process that exits with its Gloo process group alive can abort in the interpreter's teardown
    ("terminate called without an active exception"): every stage command destroys it, after a failure too."""
    import torch.distributed as dist

    from stages.cli import run_main, stage_parser

    def fn(cfg, run, args):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        if fails:
            raise UserError("a user error inside the stage")

    try:
        code = run_main(fn, stage_parser("stage1", "test", ("fabric",)), ["--config", SMOKE, "--run", str(tmp_path)])
        assert (code != 0) == fails
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class FakeRank:
    """The part of Fabric that ``on_rank_zero`` uses, for one rank of two; ``broadcast`` hands rank 1 what rank 0
    sent (run rank 0 first)."""

    sent: list = []

    def __init__(self, rank: int) -> None:
        self.global_rank, self.world_size = rank, 2

    def broadcast(self, obj, src=0):
        if self.global_rank == 0:
            FakeRank.sent.append(obj)
            return obj
        return FakeRank.sent.pop()


@pytest.mark.parametrize("error", [UserError("no images in /data"), OSError(28, "No space left on device")])
def test_failure_on_rank_zero_is_raised_on_every_rank(error):
    calls = []

    def fn():
        calls.append(1)
        raise error

    with pytest.raises(type(error)) as got0:  # rank 0: its own exception, unchanged
        on_rank_zero(FakeRank(0), fn)
    assert got0.value is error
    with pytest.raises(UserError) as got1:  # rank 1: a one-line error that names rank 0's
        on_rank_zero(FakeRank(1), fn)
    expected = "no images in /data" if isinstance(error, UserError) else \
        "rank 0 failed: OSError: [Errno 28] No space left on device"
    assert str(got1.value) == expected
    assert len(calls) == 1  # only rank 0 ran fn


def test_rank_zero_first_runs_on_rank_zero_then_the_others():
    order = []
    assert rank_zero_first(FakeRank(0), lambda: order.append(0) or "a") == "a"
    assert rank_zero_first(FakeRank(1), lambda: order.append(1) or "b") == "b"
    assert on_rank_zero(FakeRank(0), lambda: order.append(2) or "c") == "c"
    assert on_rank_zero(FakeRank(1), lambda: order.append(3) or "d") is None
    assert order == [0, 1, 2]


class ThreadRanks:
    """The collectives ``on_every_rank`` uses (all_gather, broadcast), for ranks run as threads of this process."""

    def __init__(self, world: int) -> None:
        import threading

        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def rank(self, r: int):
        ranks = self

        class Rank:
            global_rank, world_size = r, ranks.world

            def to_device(self, t):
                return t

            def _exchange(self, value):
                ranks.slots[r] = value
                ranks.barrier.wait()
                out = list(ranks.slots)
                ranks.barrier.wait()
                return out

            def all_gather(self, t):
                return torch.stack(self._exchange(t))

            def broadcast(self, obj, src=0):
                return self._exchange(obj)[src]

        return Rank()


def test_a_failure_on_any_rank_is_raised_on_every_rank():
    """Each rank extracts its own codes (``on_every_rank``): when rank 1 fails, rank 0 must stop with its reason,
    not wait for it at the next collective."""
    import threading

    from pipeline.distributed import on_every_rank

    ranks, results = ThreadRanks(2), {}
    error = OSError(28, "No space left on device")

    def fn(r):
        if r == 1:
            raise error
        return "done"

    def run_rank(r):
        try:
            results[r] = on_every_rank(ranks.rank(r), lambda: fn(r))
        except Exception as err:  # noqa: BLE001 - recorded for the assertions
            results[r] = err

    threads = [threading.Thread(target=run_rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results[1] is error  # the failed rank: its own exception
    assert isinstance(results[0], UserError)
    assert str(results[0]) == "rank 1 failed: OSError: [Errno 28] No space left on device"
    ranks = ThreadRanks(2)  # no failure: every rank gets its own result
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, on_every_rank(ranks.rank(r), lambda: r)))
               for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {0: 0, 1: 1}


# ---------------------------------------------------------------------------------------------------------
# torchrun: both ranks observed


# stage 1 under torchrun, one launch for three runs one after the other in the same two processes (tests/mp_helper.py):
# DDP, FSDP with the same settings (compared with DDP below), and FSDP with bf16-mixed
STAGE1_RUN = ["stage1.max_steps=8", "stage1.checkpoint_every=4", "stage1.eval_every=4", "vqvae.restart_after=2"]
FSDP = ["fabric.devices=2", "fabric.strategy=fsdp"]
STAGE1_RUNS = {"ddp": STAGE1_RUN, "fsdp": [*FSDP, *STAGE1_RUN],
               "fsdp_bf16": ["fabric.strategy=fsdp", "fabric.precision=bf16-mixed", "stage1.max_steps=4",
                             "stage1.eval_every=4"]}


@pytest.fixture(scope="module")
def torchrun_stage1(tmp_path_factory):
    """Stage 1 for 8 steps under torchrun with 2 processes, under DDP and under FSDP; restarts after 2 idle steps
    so the k-means init, EMA all-reduce and restart broadcast all run; and 4 steps of FSDP in bf16-mixed. Returns
    {name: (per-rank records, run folder, the run's stdout)} and the process."""
    from tests.mp_helper import MARK

    base = tmp_path_factory.mktemp("torchrun")
    out, args = base / "ranks.json", []
    for name, overrides in STAGE1_RUNS.items():
        args += ["--", name, str(base / name), *overrides]
    proc = run_cmd(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tests.mp_helper",
                    str(out), *args[1:]])
    assert proc.returncode == 0
    records = json.loads(out.read_text())
    stdout = dict(part.split("\n", 1) for part in proc.stdout.split(MARK)[1:])  # each run's output by its name
    assert list(records) == list(stdout) == list(STAGE1_RUNS)
    return {name: (records[name], base / name, stdout[name]) for name in STAGE1_RUNS}, proc


@pytest.fixture(scope="module")
def torchrun_ranks(torchrun_stage1):
    """The DDP run of ``torchrun_stage1``: (per-rank records, run folder, its stdout)."""
    return torchrun_stage1[0]["ddp"]


@pytest.mark.slow
def test_torchrun_ranks_hold_identical_weights_and_codebooks(torchrun_ranks):
    ranks, _, _ = torchrun_ranks
    assert [(r["rank"], r["world"], r["env_rank"], r["torchelastic"]) for r in ranks] == \
        [(0, 2, "0", True), (1, 2, "1", True)]
    a, b = ranks
    # every tensor of the final state: parameters, codebooks, EMA counts and sums, restart counters
    assert {k for k in a["hashes"] if k.startswith("quantizers.")} >= {
        f"quantizers.{i}.{name}" for i in range(2) for name in ("codebook", "ema_count", "ema_sum", "unused_steps")}
    assert a["hashes"] == b["hashes"]
    # at the start of every step, before DDP's forward re-broadcasts buffers from rank 0
    assert len(a["steps"]) == len(b["steps"]) == 8 and a["steps"] == b["steps"]
    # ... while every step the two ranks trained on different images (the data is sharded)
    assert all(x != y for x, y in zip(a["batches"], b["batches"]))


@pytest.mark.slow
def test_torchrun_run_folder_is_written_once_by_rank_zero(torchrun_ranks):
    _, run_dir, stdout = torchrun_ranks
    cached = [f for f in files(run_dir) if f.startswith("data/cache/")]
    tensorboard = [f for f in files(run_dir) if f.startswith("stage1/tensorboard/")]
    assert len(tensorboard) == 1 and "/version_0/events.out.tfevents." in tensorboard[0]  # one event file: rank 0's
    assert [f for f in files(run_dir) if f not in cached + tensorboard] == [
        "config.yaml", "data/preview.png", "data/summary.json", "stage1/best.ckpt", "stage1/last.ckpt",
        "stage1/logs/version_0/metrics.csv", "stage1/reconstructions.png"]
    assert len({f.split("/")[2] for f in cached}) == 1 and any(f.endswith("/info.json") for f in cached)  # rank 0
    assert not any("/." in f for f in cached)  # no temporary folder of a second preparation left behind
    assert load_checkpoint(run_dir / "stage1" / "last.ckpt")["step"] == 8
    assert stdout.count("stage 1 done") == 1


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """tests/mp_resume_helper.py under DDP and under FSDP with sharded checkpoints, one launch for both (one after
    the other in the same two processes). Returns ({kind: rank 0's result}, run folder, process)."""
    base = tmp_path_factory.mktemp("resume")
    out = base / "resume.json"
    proc = run_cmd(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "tests.mp_resume_helper", str(base / "run"), str(out), "ddp", "sharded"])
    assert proc.returncode == 0
    return json.loads(out.read_text()), base / "run", proc


@pytest.mark.slow
def test_two_process_resume_is_bit_exact(resume_runs):
    """Every rank's RNG state is saved and restored: a 2-process run stopped by Ctrl-C and resumed ends with the
    same weights as one that ran straight, although each rank's loss draws its own random numbers."""
    result = resume_runs[0]["ddp"]
    assert result["strategy"] == "DDPStrategy"
    assert result["stopped_at"] == 3 and result["steps"] == [8, 8]  # stopped after step 3 of 8, then resumed
    assert result["rng_ranks"] == [2, 5056]  # both ranks' torch RNG states in the checkpoint
    assert result["equal"]


# ---------------------------------------------------------------------------------------------------------
# real stage commands with fabric.devices=2


@pytest.fixture(scope="module")
def resume_chain(smoke_run, tmp_path_factory):
    """A 1-process checkpoint (smoke_run, step 20) continued by 2 processes until Ctrl-C (SIGINT to the process
    the user started, rank 0) after their first checkpoint; then continued by 1 process (in this pytest
    process) in the test below."""
    run_dir = copy_run(smoke_run, tmp_path_factory.mktemp("chain") / "run", parts=("config.yaml", "stage1"))
    before = set(files(run_dir))
    last = run_dir / "stage1" / "last.ckpt"
    first = last.stat().st_mtime_ns
    cmd = [sys.executable, "-m", "stages.stage1", "--config", SMOKE, "--run", str(run_dir), "fabric.devices=2",
           *CHAIN]
    with open(run_dir.parent / "out.txt", "w") as out, open(run_dir.parent / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=out, stderr=err)
        t0 = time.monotonic()
        while last.stat().st_mtime_ns == first:  # the first checkpoint of the 2-process run (atomic rename)
            assert proc.poll() is None and time.monotonic() - t0 < TIMEOUT
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(TIMEOUT)
    stdout, stderr = (run_dir.parent / "out.txt").read_text(), (run_dir.parent / "err.txt").read_text()
    return run_dir, code, stdout, stderr, before, set(files(run_dir))


CHAIN = ["stage1.max_steps=400", "stage1.checkpoint_every=10", "stage1.eval_every=1000"]


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_in_two_and_ctrl_c_stops_both(resume_chain):
    run_dir, code, out, err, before, after = resume_chain
    last = run_dir / "stage1" / "last.ckpt"
    assert code == 130, (out, err)  # rank 0's code; rank 1 exits 0 so that Fabric's launcher does not kill rank 0
    assert out.count(f"stage 1: resuming from {last} at step 20") == 1  # printed by rank 0 only
    step = load_checkpoint(last)["step"]
    assert 30 <= step < 400
    assert out.count(f"stage 1: interrupted; saved {last} at step {step}; run again to resume") == 1
    assert "Traceback" not in err
    # only rank 0 wrote: one new log version, no duplicates, nothing temporary
    new = {f for f in after - before if not f.startswith("data/")}
    tensorboard = {f for f in new if f.startswith("stage1/tensorboard/version_1/events.out.tfevents.")}
    assert len(tensorboard) == 1 and new - tensorboard == {"stage1/logs/version_1/metrics.csv"}
    assert leftovers(run_dir) == []


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(resume_chain, capsys):
    run_dir = resume_chain[0]
    step = load_checkpoint(run_dir / "stage1" / "last.ckpt")["step"]
    assert run(stage1, run_dir, *CHAIN[1:], f"stage1.max_steps={step + 5}") == 0
    assert f"resuming from {run_dir / 'stage1' / 'last.ckpt'} at step {step}" in capsys.readouterr().out
    ckpt = load_checkpoint(run_dir / "stage1" / "last.ckpt")
    assert ckpt["step"] == step + 5 and np.isfinite(ckpt["metrics"]["mse"])
    assert leftovers(run_dir) == []


EXTRACT = ["extract.batch_size=16", "extract.shard_size=100"]  # several batches and shard files on each rank


@pytest.fixture(scope="module")
def stage2_two_processes(smoke_run, tmp_path_factory):
    run_dir = copy_run(smoke_run, tmp_path_factory.mktemp("stage2x2") / "run", parts=("config.yaml", "stage1"))
    return run_dir, torchrun_stage("stage2", run_dir, "stage2.max_steps=10", *EXTRACT)


@pytest.mark.slow
def test_stage2_with_two_processes(stage2_two_processes):
    run_dir, proc = stage2_two_processes
    assert proc.returncode == 0
    assert proc.stdout.count("stage 2 done: top prior") == 1 and proc.stdout.count("stage 2 done: bottom prior") == 1
    manifest = json.loads((run_dir / "codes" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["n"] == 540
    for level in ("top", "bottom"):
        ckpt = load_checkpoint(run_dir / "stage2" / level / "last.ckpt")
        assert ckpt["step"] == 10 and np.isfinite(ckpt["metrics"]["nll_bits"])
    summary = json.loads((run_dir / "stage2" / "summary.json").read_text())
    assert set(summary["levels"]) == {"top", "bottom"}
    assert [f for f in files(run_dir / "stage2") if "logs" in f] == ["logs/version_0/metrics.csv"]
    assert leftovers(run_dir) == []


@pytest.mark.slow
def test_every_rank_extracts_its_own_codes_and_they_equal_one_process(stage2_two_processes, tmp_path):
    """Each rank writes the shards of its contiguous range; the manifest lists them in dataset order, so the codes
    and labels read back equal a 1-process extraction's. Compared exactly: both extract the same batches of 16
    (rank ranges start at batch boundaries) with 1 thread on this CPU, so the arithmetic, and every argmin tie,
    is the same; a shard list out of order or a missing range would fail."""
    run_dir, proc = stage2_two_processes
    assert proc.returncode == 0 and "written by 2 processes" in proc.stdout
    folder = run_dir / "codes"
    two = json.loads((folder / "manifest.json").read_text())
    vqvae, cfg1, stage1_path = load_vqvae(RunFolder(run_dir))
    data = load_image_data(cfg1.data, cache_dir=RunFolder(run_dir).data_cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = extract_codes(vqvae, stage1_path, data.train, data.holdout, tmp_path / "one", data.class_names,
                            ["top", "bottom"], cfg1.data.image_size, batch_size=16, shard_size=100, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert two["stage1_sha256"] == one["stage1_sha256"]
    for split, images in (("train", data.train), ("holdout", data.holdout)):
        shards = two["splits"][split]["shards"]
        assert {s["rank"] for s in shards} == {0, 1}  # both ranks wrote files of this split
        assert [s["start"] for s in shards] == np.cumsum([0] + [s["n"] for s in shards])[:-1].tolist()
        assert sum(s["n"] for s in shards) == two["splits"][split]["n"] == len(images)  # every image once
        assert all((folder / s[k]).is_file() for s in shards for k in ("top", "bottom", "labels"))
        idx = list(range(len(images)))
        codes2, labels2 = CodeSet(folder, split, two).__getitems__(idx)
        codes1, labels1 = CodeSet(tmp_path / "one", split, one).__getitems__(idx)
        assert torch.equal(labels2, labels1) and torch.equal(labels2, images.labels)
        assert all(torch.equal(a, b) for a, b in zip(codes2, codes1))


# ---------------------------------------------------------------------------------------------------------
# FSDP (torch's FullyShardedDataParallel over gloo: the same strategy code as on GPUs, on CPU processes)

def launch_stage(stage: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The stage command with Fabric's own launcher (it starts the second process)."""
    return run_cmd(["-m", f"stages.{stage}", "--config", SMOKE, "--run", str(run_dir), *overrides])


@pytest.mark.slow
def test_fsdp_trains_stage1_like_ddp(torchrun_stage1):
    """Stage 1 under FSDP and under DDP (``torchrun_stage1``: the same settings, data shards and seeds) ends with
    the same weights and Adam moments, saved alike."""
    runs = torchrun_stage1[0]
    (fsdp_ranks, fsdp_dir, fsdp_out), (ddp_ranks, ddp_dir, _) = runs["fsdp"], runs["ddp"]
    assert [r["strategy"] for r in fsdp_ranks] == ["FullStateFSDP"] * 2
    assert [r["strategy"] for r in ddp_ranks] == ["DDPStrategy"] * 2
    assert fsdp_out.count("stage 1 done") == 1  # rank 0 reports; validation ran on both ranks without a hang
    a, b = (load_checkpoint(d / "stage1" / "last.ckpt") for d in (fsdp_dir, ddp_dir))
    # a full (consolidated) state dict: one file, the plain module's parameter names, nothing sharded
    assert list(a["model"]) == list(b["model"]) and a["step"] == b["step"] == 8
    for key in a["model"]:
        assert a["model"][key].shape == b["model"][key].shape
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5)
    # optimizer state keyed by parameter name under both strategies, with matching Adam moments
    groups = [[g["params"] for g in ckpt["optimizer"]["param_groups"]] for ckpt in (a, b)]
    assert groups[0] == groups[1] and all(isinstance(n, str) and n in a["model"] for g in groups[0] for n in g)
    assert set(a["optimizer"]["state"]) == set(b["optimizer"]["state"]) == {n for g in groups[0] for n in g}
    for name, moments in a["optimizer"]["state"].items():
        torch.testing.assert_close(moments["exp_avg"], b["optimizer"]["state"][name]["exp_avg"], rtol=1e-3, atol=1e-6)
    assert (fsdp_dir / "stage1" / "reconstructions.png").is_file() and leftovers(fsdp_dir) == []


@pytest.mark.slow
def test_fsdp_mixed_precision_keeps_the_quantizer_statistics_in_float32(torchrun_stage1):
    """Fabric's FSDP bf16-mixed would cast buffers (the EMA codebook statistics) to bf16 too."""
    ranks, run_dir, _ = torchrun_stage1[0]["fsdp_bf16"]
    for rank in ranks:
        assert rank["strategy"] == "FullStateFSDP"
        dtypes = rank["buffer_dtypes"]
        assert {k for k in dtypes if k.endswith(("ema_sum", "ema_count", "codebook"))}  # the EMA quantizer's
        assert all(d in ("torch.float32", "torch.int64", "torch.bool") for d in dtypes.values()), dtypes
    mse = load_checkpoint(run_dir / "stage1" / "last.ckpt")["metrics"]["mse"]
    assert np.isfinite(mse)


@pytest.mark.slow
def test_fsdp_checkpoints_resume_in_one_process_and_the_other_way(torchrun_stage1, capsys):
    run_dir = torchrun_stage1[0]["fsdp"][1]
    last = run_dir / "stage1" / "last.ckpt"
    assert run(stage1, run_dir, *STAGE1_RUN[1:], "stage1.max_steps=13") == 0  # FSDP checkpoint -> 1 process
    assert f"resuming from {last} at step 8" in capsys.readouterr().out
    proc = launch_stage("stage1", run_dir, *FSDP, *STAGE1_RUN[1:], "stage1.max_steps=18")  # 1-process -> FSDP
    assert proc.returncode == 0 and proc.stdout.count(f"resuming from {last} at step 13") == 1
    ckpt = load_checkpoint(last)
    assert ckpt["step"] == 18 and np.isfinite(ckpt["metrics"]["mse"])


@pytest.mark.slow
def test_fsdp_stage2_then_sampling_in_one_process(torchrun_stage1, tmp_path, capsys):
    run_dir = copy_run(torchrun_stage1[0]["ddp"][1], tmp_path / "run", parts=("config.yaml", "stage1"))
    proc = launch_stage("stage2", run_dir, *FSDP, "stage2.max_steps=10")
    assert proc.returncode == 0
    assert proc.stdout.count("stage 2 done: top prior") == 1 and proc.stdout.count("stage 2 done: bottom prior") == 1
    for level in ("top", "bottom"):
        ckpt = load_checkpoint(run_dir / "stage2" / level / "last.ckpt")
        assert ckpt["step"] == 10 and np.isfinite(ckpt["metrics"]["nll_bits"])
    assert run(sample, run_dir) == 0  # priors trained under FSDP load like any others
    assert "sample: 40 images" in capsys.readouterr().out


@pytest.mark.slow
def test_fsdp_shards_a_prior_block_by_block_and_holds_half_its_parameters(tmp_path):
    """DDP holds every parameter on every rank; FSDP over 2 ranks holds half, and with one unit per transformer
    block a rank gathers one block at a time, not the whole model (a single unit would gather all of it)."""
    out = tmp_path / "fsdp.json"
    proc = run_cmd(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bench.fsdp_worker",
                    str(out), "fsdp", "prior.bottom.n_layer=4", "fabric.activation_checkpointing=true"])
    assert proc.returncode == 0
    ranks = json.loads(out.read_text())
    for r in ranks:
        assert r["local_bytes"] <= 0.6 * r["model_bytes"]  # DDP's per-rank bytes are model_bytes
        assert len(r["units"]) == 4 + 1  # the 4 blocks and the root (embeddings, final norm, head)
        assert max(r["units"]) * 4 <= 0.3 * r["model_bytes"]  # float32: the largest unit is a fraction
        assert r["checkpointed"] == 4 and np.isfinite(r["loss"])  # each block's activations recomputed
    assert sum(r["local_bytes"] for r in ranks) >= ranks[0]["model_bytes"]  # the shards hold every parameter


@pytest.mark.slow
def test_fsdp_sharded_checkpoints_resume_bit_exact_and_become_one_file(resume_runs, capsys):
    """fabric.fsdp_checkpoint=sharded: each rank writes its shard (no rank gathers the model), a 2-process resume
    reads the shards and ends bit-exact with the straight run, and training ends with the single file every stage
    loads (plain parameter names, optimizer state by name); one process resumes a stopped run from the shards."""
    results, run_dir, proc = resume_runs
    result = results["sharded"]
    assert result["strategy"] == "FullStateFSDP"
    assert result["stopped_at"] == 3 and result["steps"] == [8, 8] and result["equal"]
    assert result["shards"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # one shard per rank
    assert not result["file_when_stopped"]  # the stop saved shards only
    assert proc.stdout.count(f"resuming from {run_dir / 'sharded' / 'stopped' / 'last.dcp'} at step 3") == 1
    assert result["model_keys"] == ["bias", "weight"] and result["optimizer_groups"] == [["weight"], ["bias"]]
    # torch's sharded tensors need contiguous parameters: channels_last is refused before training, in one line
    assert result["channels_last"].startswith("conv: parameters in the channels_last memory format cannot be saved")
    assert "channels_last=false" in result["channels_last"] and "fabric.fsdp_checkpoint=full" in result["channels_last"]

    from pipeline.training import fit
    from tests.mp_resume_helper import task, train_config

    stopped = run_dir / "sharded" / "interrupted"
    assert not (stopped / "last.ckpt").exists()
    fit(make_fabric(FabricConfig(devices=1, precision="32-true", threads=1)), task(), train_config(), stopped)
    assert f"resuming from {stopped / 'last.ckpt'} at step 3" in capsys.readouterr().out  # converted first
    ckpt = load_checkpoint(stopped / "last.ckpt")
    assert ckpt["step"] == 8 and torch.isfinite(ckpt["model"]["weight"]).all()


@pytest.mark.slow
def test_stage2_failure_on_rank_zero_stops_both_ranks_with_its_message(smoke_run, tmp_path):
    """Rank 0 decides on reuse and prepares the codes folder; when that fails, rank 1 must stop with rank 0's
    reason, not wait for it or die in a gloo collective."""
    run_dir = copy_run(smoke_run, tmp_path / "run", parts=("config.yaml", "stage1"))
    (run_dir / "codes").write_text("a file where the codes folder goes")
    proc = torchrun_stage("stage2", run_dir, "stage2.max_steps=2")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"rank 0 failed: FileExistsError: [Errno 17] File exists: '{run_dir / 'codes'}'" in out  # rank 1's line
    assert "[rank1]" not in out  # no traceback from rank 1 (e.g. a gloo "Connection closed by peer")
    assert not (run_dir / "stage2").exists()


@pytest.fixture(scope="module")
def two_process_samples(smoke_run, tmp_path_factory):
    run_dir = copy_run(smoke_run, tmp_path_factory.mktemp("sample2") / "run",
                       parts=("config.yaml", "stage1", "codes", "stage2"))
    proc = torchrun_stage("sample", run_dir)
    return run_dir, proc


@pytest.mark.slow
def test_sampling_with_two_processes_gives_the_same_images(smoke_run, two_process_samples):
    """Each rank writes the shard it drew (no gather); read through the manifest they are the 1-process images."""
    run_dir, proc = two_process_samples
    assert proc.returncode == 0 and proc.stdout.count("sample: 40 images") == 1
    assert files(run_dir / "samples") == ["grid.png", "manifest.json", "shard-00000-of-00002.npz",
                                          "shard-00001-of-00002.npz"]
    one, two = load_sample_set(smoke_run / "samples"), load_sample_set(run_dir / "samples")
    assert one.settings == two.settings and len(one) == len(two) == 40
    a, b = one.take(range(40)), two.take(range(40))
    assert sorted(a) == sorted(b)
    assert np.array_equal(a["labels"], b["labels"])  # drawn from seeds, not computed in floats: exact
    levels = sorted(k for k in a if k.startswith("codes_"))
    assert_same_images(a["images"], [a[k] for k in levels], b["images"], [b[k] for k in levels])
    with np.load(run_dir / "samples" / "shard-00001-of-00002.npz") as shard:  # rank 1 drew samples 1, 3, 5, ...
        assert np.array_equal(shard["labels"], a["labels"][1::2])
    assert files(run_dir / "sampler") == ["README.md", "config.json", "model.safetensors", "samples.png"]
    assert leftovers(run_dir) == []


@pytest.mark.slow
def test_evaluation_with_two_processes_gives_the_same_numbers(two_process_samples, tmp_path):
    """Each rank scores its share: FID and IS from all-reduced sums, precision/recall/KID from the first 30
    features gathered on rank 0 (evaluate.gather_features); the numbers are the 1-process run's on the same
    shards, and the real sets' statistics are computed by both (their own reference_dir), not read."""
    run2, proc = two_process_samples
    assert proc.returncode == 0
    run1 = copy_run(run2, tmp_path / "one")  # the same samples, evaluated by one process (in this process)
    assert run(evaluate, run1, f"evaluate.reference_dir={tmp_path / 'ref1'}", "evaluate.gather_features=30") == 0
    two = torchrun_stage("evaluate", run2, f"evaluate.reference_dir={tmp_path / 'ref2'}",
                         "evaluate.gather_features=30")
    assert two.returncode == 0 and "read from" not in two.stdout
    a = json.loads((run1 / "eval" / "report.json").read_text())
    b = json.loads((run2 / "eval" / "report.json").read_text())

    def numbers(report, prefix=""):
        out = {}
        for k, v in report.items():
            if k in ("eval_seconds", "feature_seconds", "feature_speed"):  # timings (and rank 0's share), not results
                continue
            if isinstance(v, dict):
                out.update(numbers(v, f"{prefix}{k}."))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[prefix + k] = float(v)
        return out

    na, nb = numbers(a), numbers(b)
    assert set(na) == set(nb) and {"fid", "precision", "recall", "real_floor.fid", "recon.rfid",
                                   "inception_score.mean", "kid.mean"} <= set(na)
    for key in na:
        assert nb[key] == pytest.approx(na[key], rel=1e-5, abs=1e-6), key
    # the classifier was trained once, by rank 0, and cached; every file written once
    assert [f.split("-")[0] for f in files(run2 / "eval")] == [
        "classifier.ckpt", "codebook_usage.png", "reconstructions.png", "reference/recon", "report.json", "report.md"]
    assert [f.split("-")[0] for f in files(tmp_path / "ref2")] == ["holdout", "train"]
    assert two.stdout.count("domain classifier: held-out accuracy") == 1
    assert leftovers(run2) == []
