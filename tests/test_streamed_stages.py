"""The stages after stage 1 on a streamed folder (data.streaming=always): they read the image files as stage 1
does, never decoding the whole set into RUN/data/cache, and find what the cached path finds."""

import shutil

import numpy as np
import torch

from pipeline.codes import CodeSet, load_manifest
from stages import stage1, stage2
from tests.conftest import run
from tests.stream_helper import png_folder

SHORT = ["stage1.max_steps=2", "stage1.batch_size=8", "stage2.max_steps=2", "stage2.batch_size=8",
         "extract.batch_size=32"]


def decode_up_front(run_dir) -> None:
    """The same stage-1 model, its data decoded up front: only data.streaming changes in the checkpoints' config
    (stage 2 reads stage 1's data settings from its checkpoint)."""
    for ckpt in (run_dir / "stage1").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=False)
        state["meta"]["config"]["data"]["streaming"] = "never"
        torch.save(state, ckpt)


def codes_of(run_dir, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    codes = CodeSet(run_dir / "codes", split, load_manifest(run_dir / "codes"))
    grids, labels = codes.__getitems__(list(range(len(codes))))
    return [g.numpy() for g in grids], labels.numpy()


def test_stage2_extracts_the_same_codes_from_a_streamed_folder_without_a_data_cache(tmp_path):
    images = png_folder(tmp_path / "images", 200)
    streamed = tmp_path / "streamed"
    data = ["data.source=folder", f"data.path={images}", "data.image_size=16", "data.streaming=always",
            "data.num_workers=2"]  # stage 2 decodes in 2 DataLoader workers too (stage 1's data settings)
    assert run(stage1, streamed, *data, *SHORT) == 0
    cached = tmp_path / "cached"
    shutil.copytree(streamed, cached)
    decode_up_front(cached)
    assert run(stage2, streamed, *SHORT) == 0
    assert not (streamed / "data" / "cache").exists()  # nothing decoded up front
    assert run(stage2, cached, *SHORT) == 0
    assert (cached / "data" / "cache").is_dir()  # the control: this path does decode into the cache
    for split, n in (("train", 180), ("holdout", 20)):
        (s_codes, s_labels), (c_codes, c_labels) = codes_of(streamed, split), codes_of(cached, split)
        assert len(s_labels) == n and set(s_labels.tolist()) == {0, 1}
        np.testing.assert_array_equal(s_labels, c_labels)
        for s, c in zip(s_codes, c_codes):
            np.testing.assert_array_equal(s, c)  # same files, same decoding, same batches: the same argmin
