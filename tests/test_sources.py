"""Data sources beyond decoding: one file -> the training array, own held-out splits (folders, Hub datasets, IDX),
the preparation cache, parallel decoding, training-only augmentation, and the data summary."""

import gzip
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import sources
from pipeline.config import DataConfig, load_config
from pipeline.data import augment, data_summary, load_image_data, load_image_file
from pipeline.io import UserError
from tests.stream_helper import private_datasets_cache


def noise_png(path, seed, mode="L", size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, len(mode))
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape).astype(np.uint8), mode).save(path)
    return path


def split_folder(root, splits=("train", "val"), classes=("cat", "dog"), n=4):
    for s, split in enumerate(splits):
        for c, cls in enumerate(classes):
            for i in range(n):
                noise_png(root / split / cls / f"{i}.png", seed=100 * s + 10 * c + i)
    return root


def folder_cfg(path, **kw):
    return DataConfig(source="folder", path=str(path), image_size=16, **kw)


def all_pixels(data):
    return torch.cat([data.train.all_pixels(), data.holdout.all_pixels()])


def test_one_file_gives_exactly_the_array_training_sees(tmp_path):
    rgba = Image.new("RGBA", (24, 20), (200, 0, 0, 0))  # transparent, hiding red
    rgba.paste((0, 0, 255, 255), (4, 4, 12, 12))
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            rgba.save(tmp_path / "imgs" / cls / f"{i}.png")
    path = tmp_path / "imgs" / "a" / "0.png"
    arr = load_image_file(path, 16, 3)
    assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8
    assert np.array_equal(load_image_file(path.read_bytes(), 16, 3), arr)
    assert np.array_equal(load_image_file(Image.open(path), 16, 3), arr)
    assert (arr[:, 0, 0] == 255).all()  # the transparent corner is white, not the red stored under it
    data = load_image_data(folder_cfg(tmp_path / "imgs", channels=3, holdout_fraction=0.3))
    assert all(torch.equal(torch.from_numpy(arr), p) for p in all_pixels(data))


def test_folder_with_train_and_val_uses_its_own_split(tmp_path):
    root = split_folder(tmp_path / "d")
    data = load_image_data(folder_cfg(root))
    assert (len(data.train), len(data.holdout)) == (8, 8) and data.class_names == ["cat", "dog"]
    assert data.holdout_source == "the data's own val split"
    val = np.stack([load_image_file(p, 16, 1) for p in sorted((root / "val").rglob("*.png"))])
    assert sorted(map(bytes, val)) == sorted(map(bytes, data.holdout.all_pixels().numpy()))
    assert sorted(data.holdout.labels.tolist()) == [0] * 4 + [1] * 4

    carved = load_image_data(folder_cfg(root, holdout_split="none", holdout_fraction=0.25))
    assert (len(carved.train), len(carved.holdout)) == (6, 2) and "carve-out" in carved.holdout_source
    capped = load_image_data(folder_cfg(root, max_images=10, holdout_fraction=0.2))
    assert (len(capped.train), len(capped.holdout)) == (8, 2) and "2 of 8 drawn" in capped.holdout_source


def test_val_is_preferred_to_test_and_validation_is_found(tmp_path):
    both = load_image_data(folder_cfg(split_folder(tmp_path / "a", ("train", "test", "val"))))
    assert both.holdout_source == "the data's own val split"
    named = load_image_data(folder_cfg(tmp_path / "a", holdout_split="test"))
    assert named.holdout_source == "the data's own test split"
    assert load_image_data(folder_cfg(split_folder(tmp_path / "b", ("train", "validation")))).holdout_source == (
        "the data's own validation split")


@pytest.mark.parametrize("case, message", [
    ("stray", "has split folders and 1 image(s) at its top (x.png); move them into train/"),
    ("extra_class", "has class folders emu that"),
    ("missing_split", "data.holdout_split=test is not a folder of data.path="),
    ("no_split_layout", "data.holdout_split=val but data.path="),
])
def test_split_folder_mistakes_are_one_line(tmp_path, case, message):
    root = split_folder(tmp_path / "d")
    holdout_split = "auto"
    if case == "stray":
        noise_png(root / "x.png", 0)
    elif case == "extra_class":
        noise_png(root / "val" / "emu" / "0.png", 0)
    elif case == "missing_split":
        holdout_split = "test"
    else:
        root, holdout_split = root / "train", "val"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_image_data(folder_cfg(root, holdout_split=holdout_split))


def write_idx(path, arr, gz=True):
    arr = np.asarray(arr, np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def idx_folder(root, n_train=12, n_test=6, gz=True):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if n:
            write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 255, (n, 28, 28)), gz)
            write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 3, gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_with_their_test_split_and_names(tmp_path, gz):
    root = idx_folder(tmp_path / "idx", gz=gz)
    cfg = DataConfig(source="idx", path=str(root), class_names=["x", "y", "z"])
    data = load_image_data(cfg)
    assert (len(data.train), len(data.holdout)) == (12, 6) and data.class_names == ["x", "y", "z"]
    assert data.holdout_source == "the data's own test split"
    images = sources.read_idx(root / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    expected = np.stack([load_image_file(Image.fromarray(im, "L"), 32, 1) for im in images])
    assert sorted(map(bytes, expected)) == sorted(map(bytes, data.train.all_pixels().numpy()))
    assert load_image_data(DataConfig(source="idx", path=str(root))).class_names == ["0", "1", "2"]


def test_idx_mistakes_are_one_line(tmp_path, monkeypatch):
    root = idx_folder(tmp_path / "idx", gz=False)
    with pytest.raises(UserError, match="data.class_names has 2 names but the labels go up to 2; give 3 names"):
        load_image_data(DataConfig(source="idx", path=str(root), class_names=["x", "y"]))
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(UserError, match="is truncated: its header says 12 x 28 x 28 = 9408 bytes, it holds 9403"):
        load_image_data(DataConfig(source="idx", path=str(root)))
    path.write_bytes(b"\x89PNG....")
    with pytest.raises(UserError, match="is not a uint8 IDX file"):
        load_image_data(DataConfig(source="idx", path=str(root)))
    monkeypatch.setattr(sources, "FASHION_IDX", str(tmp_path / "fashion"))  # where the Debian package would be
    with pytest.raises(UserError, match="is not a folder .install it: apt-get install dataset-fashion-mnist, or"):
        load_image_data(DataConfig(source="idx", path=str(tmp_path / "fashion")))


def test_fashion_preset_reads_the_debian_package_when_installed():
    cfg = load_config("configs/fashion.yaml")
    if not (sources.Path(cfg.data.path) / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    train = sources._idx_pair(sources.Path(cfg.data.path), "train")
    assert train[0].shape == (60000, 28, 28) and np.bincount(train[1]).tolist() == [6000] * 10
    assert cfg.data.class_names[9] == "Ankle boot"


def test_hub_dataset_splits_and_class_label_names_offline(tmp_path, monkeypatch):
    """A local copy of a Hub dataset (parquet files named by split, as on the Hub) loads through the Hub path:
    ClassLabel names, the test split held out."""
    datasets = pytest.importorskip("datasets")
    private_datasets_cache(monkeypatch, tmp_path / "hf")  # not ~/.cache/huggingface
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])})

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20)).astype(np.uint8)).save(buf, "PNG")
        return {"bytes": buf.getvalue(), "path": None}

    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split, n in (("train", 10), ("test", 4)):
        ds = datasets.Dataset.from_dict({"image": [png(i) for i in range(n)], "label": [i % 2 for i in range(n)]},
                                        features=feats)
        ds.to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    cfg = DataConfig(source="hub", name=str(tmp_path / "repo"), image_size=16)
    data = load_image_data(cfg)
    assert (len(data.train), len(data.holdout)) == (10, 4) and data.class_names == ["ant", "bee"]
    assert data.holdout_source == "the data's own test split"
    carved = load_image_data(DataConfig(source="hub", name=str(tmp_path / "repo"), image_size=16,
                                        holdout_split="none", holdout_fraction=0.2))
    assert (len(carved.train), len(carved.holdout)) == (8, 2)
    with pytest.raises(UserError, match="data.split=training is not a split of .*; it has train, test"):
        load_image_data(DataConfig(source="hub", name=str(tmp_path / "repo"), split="training"))


def test_preparation_is_cached_and_redone_when_a_file_changes(tmp_path, capfd):
    root = split_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    first = load_image_data(folder_cfg(root), cache_dir=cache)
    assert "preparing images" in capfd.readouterr().err and not first.prepared["cached"]
    again = load_image_data(folder_cfg(root), cache_dir=cache)
    assert "preparing images" not in capfd.readouterr().err and again.prepared["cached"]
    assert torch.equal(all_pixels(again), all_pixels(first)) and again.holdout_source == first.holdout_source
    assert again.class_names == first.class_names
    noise_png(root / "train" / "cat" / "0.png", seed=999)  # new content (and size or time): prepared again
    changed = load_image_data(folder_cfg(root), cache_dir=cache)
    assert not changed.prepared["cached"] and not torch.equal(all_pixels(changed), all_pixels(first))
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1  # the old entry is gone


def test_parallel_decoding_gives_the_same_images(tmp_path, monkeypatch):
    root = split_folder(tmp_path / "d", n=6)
    serial = load_image_data(folder_cfg(root, num_proc=1))
    monkeypatch.setattr(sources, "PARALLEL_MIN", 4)  # 12 train images: 2 processes
    parallel = load_image_data(folder_cfg(root, num_proc=2))
    assert torch.equal(all_pixels(parallel), all_pixels(serial))
    assert torch.equal(parallel.train.labels, serial.train.labels)


def test_hflip_gives_each_image_or_its_mirror_about_half_the_time():
    x = torch.rand(400, 3, 8, 8) * 2 - 1
    out = augment(x, hflip=True, crop_scale=1.0)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 140 < int(mirrored.sum()) < 260  # binomial(400, 1/2): 5 standard deviations either side


def test_random_resized_crop_zooms_in_and_keeps_the_shape():
    ramp = torch.linspace(-1, 1, 32).expand(1, 32, 32).repeat(64, 1, 1, 1)  # (64, 1, 32, 32), left to right
    out = augment(ramp, hflip=False, crop_scale=0.25)
    assert out.shape == ramp.shape and out.min() >= -1 and out.max() <= 1
    spans = out[:, 0, 16, -1] - out[:, 0, 16, 0]  # 2 x the crop's width share
    assert bool((spans <= 2.0 + 1e-5).all()) and spans.mean() < 1.9  # never zooms out; mostly zooms in
    assert bool((spans > 2.0 * (0.25 * 3 / 4) ** 0.5 - 0.05).all())  # never below the smallest crop's width
    flat = torch.full((4, 3, 16, 16), 0.3)
    assert torch.allclose(augment(flat, hflip=True, crop_scale=0.5), flat, atol=1e-6)


def test_data_summary_counts_modes_classes_and_skipped_files(tmp_path):
    root = tmp_path / "d"
    for cls in ("cat", "dog"):
        noise_png(root / cls / "grey.png", 1)
        noise_png(root / cls / "rgb.png", 2, mode="RGB")
        Image.new("LA", (20, 20), (0, 0)).save(root / cls / "la.png")
        (root / cls / "broken.png").write_bytes(b"not an image")
    cfg = folder_cfg(root, channels=3, holdout_fraction=0.25)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        data = load_image_data(cfg)
    summary = json.loads(json.dumps(data_summary(data, cfg)))
    assert summary["images"] == {"train": 4, "holdout": 2} and summary["class_names"] == ["cat", "dog"]
    assert sum(summary["per_class"]["train"].values()) == 4 and set(summary["per_class"]["holdout"]) == {"cat", "dog"}
    la = "alpha composited over white; grey -> RGB (lossless)"
    assert summary["modes"] == {"L": {"images": 2, "conversion": "grey -> RGB (lossless)"},
                                "LA": {"images": 2, "conversion": la}, "RGB": {"images": 2, "conversion": "kept as is"}}
    assert sorted(s["file"].rsplit("/", 2)[-2] for s in summary["skipped"]) == ["cat", "dog"]
    assert all("cannot identify image file" in s["reason"] for s in summary["skipped"])


def test_class_names_are_only_for_sources_without_names():
    with pytest.raises(UserError, match="data.class_names=.*only for data.source=idx or hub"):
        load_config(None, ["data.source=folder", "data.path=x", "data.class_names=[a, b]"])
    with pytest.raises(UserError, match="data.crop_scale=0.0 is not allowed: must be in"):
        load_config(None, ["data.crop_scale=0.0"])
