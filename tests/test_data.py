"""Data sources and their errors (the embedded digits, an image folder; the Hub path needs the network)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import fit_image, load_image_data, to_float, to_uint8
from pipeline.io import UserError
from tests.conftest import bomb_png


def test_embedded_digits_split_and_scale():
    data = load_image_data(DataConfig(image_size=32, holdout_fraction=0.2))
    assert len(data.train) == 4000 and len(data.holdout) == 1000 and data.num_classes == 10
    pixels, labels = data.train.__getitems__([0, 1, 2])
    assert pixels.shape == (3, 1, 32, 32) and pixels.dtype == torch.uint8
    x = to_float(pixels)
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1  # padded border is black
    assert torch.equal(to_uint8(x), pixels)
    assert set(data.holdout.labels.tolist()) == set(range(10))
    again = load_image_data(DataConfig(image_size=32, holdout_fraction=0.2))  # the split is fixed
    assert torch.equal(again.holdout.all_pixels(), data.holdout.all_pixels())


def test_fit_image_pads_small_and_resizes_large():
    small = Image.fromarray(np.full((28, 28), 200, np.uint8), "L")
    out = fit_image(small, 32, 1)
    assert out.shape == (1, 32, 32) and out[0, 0, 0] == 0 and out[0, 16, 16] == 200
    big = Image.fromarray(np.full((40, 80, 3), 100, np.uint8), "RGB")
    out = fit_image(big, 16, 3)
    assert out.shape == (3, 16, 16) and abs(int(out[1, 8, 8]) - 100) <= 1


def make_folder(root, n_per_class=4, mode="L", size=20):
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            arr = np.random.default_rng(i).integers(0, 255, (size, size) if mode == "L" else (size, size, 3))
            Image.fromarray(arr.astype(np.uint8), mode).save(root / cls / f"{i}.png")
    return root


def test_image_folder_with_class_subfolders(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing may be cached or "downloaded" for local files
    root = make_folder(tmp_path / "imgs")
    data = load_image_data(DataConfig(source="folder", path=str(root), image_size=16, holdout_fraction=0.25))
    assert len(data.train) + len(data.holdout) == 8 and data.num_classes == 2
    assert sorted(torch.cat([data.train.labels, data.holdout.labels]).tolist()) == [0] * 4 + [1] * 4
    err = capfd.readouterr().err
    assert "Downloading" not in err and "Generating" not in err and "preparing images" in err
    assert not (tmp_path / "hf").exists()


def test_image_folder_path_with_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_folder(tmp_path / "my images")
    data = load_image_data(DataConfig(source="folder", path="~/my images", image_size=16, holdout_fraction=0.25))
    assert len(data.train) + len(data.holdout) == 8


def test_decompression_bomb_is_an_unreadable_image(tmp_path):
    root = make_folder(tmp_path / "imgs")
    bomb_png(root / "dog" / "bomb.png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        data = load_image_data(DataConfig(source="folder", path=str(root), image_size=16, holdout_fraction=0.25))
    assert data.skipped == 1
    with pytest.raises(UserError, match="cannot read image .*bomb.png: .*decompression bomb.*data.on_corrupt=skip"):
        load_image_data(DataConfig(source="folder", path=str(root), image_size=16, on_corrupt="error"))


def test_corrupt_images_skipped_with_a_count_or_refused(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        data = load_image_data(DataConfig(source="folder", path=str(root), image_size=16, holdout_fraction=0.25))
    assert data.skipped == 1 and len(data.train) + len(data.holdout) == 8
    with pytest.raises(UserError, match="cannot read image .*broken.png.*data.on_corrupt=skip"):
        load_image_data(DataConfig(source="folder", path=str(root), image_size=16, on_corrupt="error"))


@pytest.mark.parametrize("case", ["missing", "empty", "not_images"])
def test_missing_or_empty_folder(tmp_path, case):
    path = tmp_path / "data"
    if case != "missing":
        path.mkdir()
    if case == "not_images":
        (path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="data.path=") as err:
        load_image_data(DataConfig(source="folder", path=str(path), image_size=16))
    assert "\n" not in str(err.value)


def test_colour_images_with_one_channel_are_converted_and_counted(tmp_path):
    root = make_folder(tmp_path / "rgb", mode="RGB")
    with pytest.warns(UserWarning, match=r"converted 8 colour image\(s\) to grey \(data.channels=1; set "):
        grey = load_image_data(DataConfig(source="folder", path=str(root), image_size=16, channels=1))
    assert grey.train.all_pixels().shape[1] == 1
    data = load_image_data(DataConfig(source="folder", path=str(root), image_size=16, channels=3))
    assert data.train.all_pixels().shape[1] == 3


def test_folder_label_rules(tmp_path):
    """Class folders give sorted class names; all images at the top is unlabelled; anything between is one line."""
    root = make_folder(tmp_path / "ok")
    (root / ".hidden").mkdir()
    Image.new("L", (8, 8)).save(root / ".hidden" / "x.png")  # hidden folders are not classes
    data = load_image_data(DataConfig(source="folder", path=str(root), image_size=16, holdout_fraction=0.25))
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), i).save(flat / f"{i}.png")
    data = load_image_data(DataConfig(source="folder", path=str(flat), image_size=16, holdout_fraction=0.25))
    assert data.class_names is None and data.num_classes == 0 and (data.train.labels == -1).all()

    Image.new("L", (8, 8)).save(root / "stray.png")
    with pytest.raises(UserError, match=r"has 1 image\(s\) at its top \(stray.png\) beside class folders"):
        load_image_data(DataConfig(source="folder", path=str(root), image_size=16))
    (root / "stray.png").unlink()
    (root / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty holds no images; add images or remove it"):
        load_image_data(DataConfig(source="folder", path=str(root), image_size=16))
    single = tmp_path / "single" / "only"
    single.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), i).save(single / f"{i}.png")
    with pytest.raises(UserError, match=r"has one class folder \(only\); add a folder per class"):
        load_image_data(DataConfig(source="folder", path=str(single.parent), image_size=16))
