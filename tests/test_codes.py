"""Code grids: extraction round trip, reuse while stage 1 is unchanged, re-extraction when it changes."""

import shutil

import numpy as np
import pytest
import torch

from pipeline.codes import CodeSet, extract_codes, extraction_plan, load_manifest
from pipeline.config import DataConfig, VQVAEConfig
from pipeline.data import load_image_data, to_float
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
