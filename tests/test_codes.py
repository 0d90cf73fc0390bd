"""Code grids: extraction round trip, reuse while stage 1 is unchanged, re-extraction when it changes."""

import shutil

import numpy as np
import pytest
import torch

from pipeline.codes import CodeSet, extract_codes, extraction_plan, load_manifest
from pipeline.config import DataConfig, VQVAEConfig
from pipeline.data import ShiftedCopies, load_image_data, to_float
from pipeline.vqvae import VQVAE2
from stages import stage2
from tests.conftest import assert_same_draws, run


def test_extract_load_same_integers_and_reextract_on_change(tmp_path):
    data = load_image_data(DataConfig(image_size=16, max_images=90, holdout_fraction=0.2))
    model = VQVAE2(VQVAEConfig(channels=16, res_channels=8, res_blocks=1, codebook_size=32, code_dim=8,
                               kmeans_init=False, restart_after=0)).eval()
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"model": model.state_dict()}, ckpt)
    folder = tmp_path / "codes"
    logs = []
    manifest = extract_codes(model, ckpt, data.train, data.holdout, folder, data.class_names, ["top", "bottom"], 16,
                             batch_size=16, shard_size=25, log=logs.append)
    assert len(manifest["splits"]["train"]["shards"]) == 3  # 72 train grids in shards of 25
    codes = CodeSet(folder, "train", load_manifest(folder))
    idx = [71, 0, 30, 24, 25, 50, 3]  # across shards, unsorted
    got, labels = codes.__getitems__(idx)
    pixels, true_labels = data.train.__getitems__(idx)
    with torch.no_grad():
        expected = model.encode(to_float(pixels))
    assert_same_draws(got, expected)  # extracted in batches of 16, encoded here as one batch of 7
    assert torch.equal(labels, true_labels)
    assert np.load(folder / "train-bottom-00000.npy", mmap_mode="r").dtype == np.int16

    extract_codes(model, ckpt, data.train, data.holdout, folder, data.class_names, ["top", "bottom"], 16,
                  log=logs.append)
    assert "reusing" in logs[-1]
    with torch.no_grad():
        model.quantizers[0].codebook.mul_(-1)  # a changed stage-1 model ...
    torch.save({"model": model.state_dict()}, ckpt)
    extract_codes(model, ckpt, data.train, data.holdout, folder, data.class_names, ["top", "bottom"], 16,
                  log=logs.append)
    assert any("changed" in line for line in logs)  # ... is extracted again
    assert load_manifest(folder)["splits"]["train"]["n"] == 72


def test_shifted_copies_move_whole_images_by_at_most_shift_whatever_the_batch():
    data = load_image_data(DataConfig(image_size=16, max_images=50, holdout_fraction=0.2))  # 40 train images
    n, shift = len(data.train), 2
    copies = ShiftedCopies(data.train, copies=3, shift=shift, seed=5)
    assert len(copies) == 4 * n
    first, labels = copies.__getitems__(list(range(n)))
    assert torch.equal(first, data.train.__getitems__(list(range(n)))[0])  # copy 0: the images themselves
    idx = [n + 7, 3 * n + 7, 2 * n + 1, 7]
    pixels, labels = copies.__getitems__(idx)
    assert labels.tolist() == data.train.__getitems__([7, 7, 1, 7])[1].tolist()
    one_by_one = torch.stack([copies.__getitems__([i])[0][0] for i in idx])
    assert torch.equal(pixels, one_by_one)  # the offset belongs to the item, not to the batch
    for row, index in enumerate(idx[:3]):
        original, (dy, dx) = data.train.__getitems__([index % n])[0][0], copies.offset(index)
        assert (dy, dx) != (0, 0) and max(abs(dy), abs(dx)) <= shift
        inner = slice(shift, 16 - shift)  # away from the repeated edge, the copy is the image moved by (dy, dx)
        moved = pixels[row][:, inner, inner]
        assert torch.equal(moved, original[:, shift - dy:16 - shift - dy, shift - dx:16 - shift - dx])
    offsets = {copies.offset(i) for i in range(n, 4 * n)}
    assert len(offsets) >= 12  # 120 draws spread over the 24 offsets of a 5 x 5 window


def test_extraction_records_the_copies_and_redoes_them_when_they_change(tmp_path):
    data = load_image_data(DataConfig(image_size=16, max_images=30, holdout_fraction=0.2))
    model = VQVAE2(VQVAEConfig(channels=16, res_channels=8, res_blocks=1, codebook_size=32, code_dim=8,
                               kmeans_init=False, restart_after=0)).eval()
    ckpt, folder, logs = tmp_path / "stage1.ckpt", tmp_path / "codes", []
    torch.save({"model": model.state_dict()}, ckpt)

    def extract(copies: int) -> dict:
        train = ShiftedCopies(data.train, copies, 1, 0) if copies else data.train
        return extract_codes(model, ckpt, train, data.holdout, folder, data.class_names, ["top", "bottom"], 16,
                             log=logs.append)
    assert extract(0)["splits"]["train"]["n"] == 24
    manifest = extract(2)
    assert "extracting again" in logs[-2] and "2 shifted copies" in logs[-1]
    assert manifest["splits"]["train"]["n"] == 72 and manifest["train_copies"] == {"copies": 2, "shift": 1}
    codes, labels = CodeSet(folder, "train", manifest).__getitems__([0, 24, 48])
    assert labels.tolist() == [labels[0].item()] * 3
    with torch.no_grad():
        expected = model.encode(to_float(ShiftedCopies(data.train, 2, 1, 0).__getitems__([0, 24, 48])[0]))
    assert_same_draws(codes, expected)
    extract(2)
    assert "reusing" in logs[-1]


def test_stage2_resumes_and_refuses_a_changed_stage1(smoke_run, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run, run_dir)
    assert run(stage2, run_dir, "stage2.max_steps=30") == 0
    out = capsys.readouterr().out
    assert "reusing" in out and out.count("resuming from") == 2
    assert torch.load(run_dir / "stage2" / "bottom" / "last.ckpt", weights_only=True)["step"] == 30
    # a retrained stage-1 model makes the old priors stale: extraction is redone and the priors refused
    ckpt = torch.load(run_dir / "stage1" / "best.ckpt", weights_only=True)
    ckpt["step"] += 1
    torch.save(ckpt, run_dir / "stage1" / "best.ckpt")
    assert run(stage2, run_dir, "stage2.max_steps=30") == 2
    captured = capsys.readouterr()
    assert "extracting again" in captured.out
    assert "trained with a different stage-1 model" in captured.err and "--fresh" in captured.err


def test_stage2_trains_on_the_shifted_copies_it_was_asked_for(smoke_run, tmp_path, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("stage2"))
    n = load_manifest(run_dir / "codes")["splits"]["train"]["n"]
    assert run(stage2, run_dir, "extract.copies=2", "stage2.max_steps=2") == 0
    assert "2 shifted copies of each" in capsys.readouterr().out
    manifest = load_manifest(run_dir / "codes")
    assert manifest["splits"]["train"]["n"] == 3 * n and manifest["train_copies"] == {"copies": 2, "shift": 1}
    assert manifest["splits"]["holdout"]["n"] == load_manifest(smoke_run / "codes")["splits"]["holdout"]["n"]


@pytest.mark.parametrize("n,world,batch,shard", [(540, 2, 16, 100), (60, 2, 16, 100), (7, 3, 4, 2), (90, 1, 16, 25),
                                                 (5, 4, 8, 10)])
def test_extraction_plan_covers_every_image_once_in_order(n, world, batch, shard):
    plan = extraction_plan(n, world, batch, shard)
    assert [s["start"] for s in plan] == np.cumsum([0] + [s["n"] for s in plan])[:-1].tolist()  # dataset order
    assert sum(s["n"] for s in plan) == n and all(0 < s["n"] <= shard for s in plan)
    assert [s["rank"] for s in plan] == sorted(s["rank"] for s in plan)  # each rank one contiguous range ...
    firsts = [next(s for s in plan if s["rank"] == r) for r in {s["rank"] for s in plan}]
    assert all(s["start"] % batch == 0 for s in firsts)  # ... of whole batches
    if world == 1:  # one process: the shards of a plain split into shard_size pieces
        assert [s["n"] for s in plan] == [min(shard, n - i) for i in range(0, n, shard)]
    if n >= world * batch:
        assert {s["rank"] for s in plan} == set(range(world))  # every rank has work
