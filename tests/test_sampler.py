"""The exported sampler: identical images to the training checkpoints, batch-size invariance, clear errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.io import UserError
from pipeline.sampler import Sampler
from stages.runfolder import RunFolder, build_sampler, load_vqvae
from tests.conftest import assert_same_images


@pytest.fixture(scope="module")
def sampler(smoke_run):
    return build_sampler(RunFolder(smoke_run))[0]


def test_export_matches_training_checkpoints_and_npz(smoke_run, sampler):
    exported = Sampler.from_pretrained(smoke_run / "sampler")
    a = sampler.generate(12, seed=3, top_k=5, labels="uniform")
    b = exported.generate(12, seed=3, top_k=5, labels="uniform")
    assert np.array_equal(a, b)  # the same computation: exact
    with np.load(smoke_run / "samples" / "samples.npz") as z:  # the sample stage's images, another batch size
        got = exported.generate_samples(40, seed=0, batch_size=7)
        assert_same_images(got.images, got.codes, z["images"], [z["codes_top"], z["codes_bottom"]])
        assert np.array_equal(got.labels, z["labels"])


def test_export_round_trip_in_fresh_process(smoke_run, sampler, tmp_path):
    script = (
        "import sys, numpy as np, torch; torch.set_num_threads(1)\n"
        "from pipeline import Sampler\n"
        "s = Sampler.from_pretrained(sys.argv[1])\n"
        "x = s.generate_samples(10, temperature=0.9, top_p=0.9, labels=[1, 2], guidance=1.5, seed=11)\n"
        "np.savez(sys.argv[2], images=x.images, top=x.codes[0], bottom=x.codes[1])\n"
    )
    out = tmp_path / "imgs.npz"
    subprocess.run([sys.executable, "-c", script, str(smoke_run / "sampler"), str(out)], check=True,
                   env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    here = sampler.generate_samples(10, temperature=0.9, top_p=0.9, labels=[1, 2], guidance=1.5, seed=11)
    with np.load(out) as there:  # another process: within rounding
        assert_same_images(there["images"], [there["top"], there["bottom"]], here.images, here.codes)


def test_same_seed_same_images_whatever_the_batch_size(sampler):
    one = sampler.generate_samples(9, seed=5, batch_size=9)
    split = sampler.generate_samples(9, seed=5, batch_size=4)
    assert_same_images(one.images, one.codes, split.images, split.codes)
    # image i is image i: a later slice of the stream equals the tail of the whole
    tail = sampler.generate_samples(4, seed=5, start=5, batch_size=3)
    assert_same_images(tail.images, tail.codes, one.images[5:], [c[5:] for c in one.codes])
    assert not np.array_equal(sampler.generate(9, seed=6), one.images)


def test_labels_reach_the_codes(sampler):
    a = sampler.generate_samples(8, labels=1, seed=0)
    b = sampler.generate_samples(8, labels=8, seed=0)
    assert (a.labels == 1).all() and (b.labels == 8).all()
    assert any(not np.array_equal(x, y) for x, y in zip(a.codes, b.codes))
    cycled = sampler.generate_samples(5, labels="3,4", seed=0)
    assert cycled.labels.tolist() == [3, 4, 3, 4, 3]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"labels": 10}, "outside the trained classes 0..9"),
        ({"labels": "seven"}, "label 'seven' is not a class of this sampler; classes: 0, 1, 2"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
        ({"top_k": -2}, "top_k=-2"),
        ({"guidance": float("inf")}, "guidance=inf is not allowed: must be >= 0 and finite"),
        ({"temperature": float("nan")}, "temperature=nan is not allowed: must be > 0 and finite"),
    ],
)
def test_bad_settings_give_one_line(sampler, kwargs, message):
    with pytest.raises(UserError) as err:
        sampler.generate(2, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_labels_of_unconditional_prior_are_refused(sampler):
    c = sampler.priors[0].num_classes
    try:
        for p in sampler.priors:
            p.num_classes = 0
        with pytest.raises(UserError, match="unconditional"):
            sampler.generate(2, labels=3)
        assert sampler.generate(2, labels="uniform").shape[0] == 2  # the default still works
    finally:
        for p in sampler.priors:
            p.num_classes = c


@pytest.mark.parametrize("damage", ["missing_weights", "missing_config", "tampered", "bad_json", "not_sampler",
                                    "old_version", "other_shapes"])
def test_damaged_sampler_folder(smoke_run, tmp_path, damage):
    folder = tmp_path / "sampler"
    shutil.copytree(smoke_run / "sampler", folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "missing_weights":
        weights.unlink()
        message = "has no model.safetensors"
    elif damage == "missing_config":
        config.unlink()
        message = "has no config.json"
    elif damage == "tampered":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
        message = "does not match the sha256"
    elif damage == "bad_json":
        config.write_text("{not json")
        message = "not valid JSON"
    elif damage == "not_sampler":
        config.write_text(json.dumps({"hello": 1}))
        message = "not a sampler config"
    else:
        values = json.loads(config.read_text())
        if damage == "old_version":  # version 1 had no encoder
            values["version"] = 1
            message = "format version 1, this package reads 2; export it again"
        else:
            values["priors"][0]["net"]["n_embd"] *= 2
            message = "does not describe the weights beside it"
        config.write_text(json.dumps(values))
    with pytest.raises(UserError, match=message):
        Sampler.from_pretrained(folder)


def test_export_holds_the_whole_vqvae_and_encodes_like_stage1(smoke_run):
    """The encoder is exported and every tensor loads strictly: encode/decode use the trained weights."""
    from pipeline.data import to_float

    exported = Sampler.from_pretrained(smoke_run / "sampler")
    vqvae, _, _ = load_vqvae(RunFolder(smoke_run))
    trained, loaded = vqvae.state_dict(), exported.vqvae.state_dict()
    assert trained.keys() == loaded.keys() and any(k.startswith("encoders.") for k in loaded)
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)  # copied tensors: exact
    with np.load(smoke_run / "samples" / "samples.npz") as z:
        images, codes = z["images"][:8], [z["codes_top"][:8], z["codes_bottom"][:8]]
    got = exported.encode(images)
    with torch.no_grad():  # the same weights, inputs and batch: the same computation
        expected = vqvae.encode(to_float(torch.from_numpy(images).permute(0, 3, 1, 2)))
    assert all(np.array_equal(g, e.numpy()) for g, e in zip(got, expected))
    decoded = exported.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - images).max() <= 1  # the sampled images are the decoded codes
    with pytest.raises(UserError, match="expected uint8"):
        exported.encode(images.astype(np.float32))
    with pytest.raises(UserError, match="codes outside"):
        exported.decode([codes[0] + 1000, codes[1]])


def test_generate_command_line(smoke_run, tmp_path):
    from pipeline.generate import main

    out = tmp_path / "sevens.png"
    assert main(["--sampler", str(smoke_run / "sampler"), "--num", "8", "--label", "7", "--out", str(out),
                 "--npz", str(tmp_path / "s.npz")]) == 0
    assert out.is_file()
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (8, 16, 16, 1)
    assert main(["--sampler", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
