"""The stages after stage 1 on a streamed folder (data.streaming=always): they read the image files as stage 1
does, never decoding the whole set into RUN/data/cache, and find what the cached path finds."""

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.codes import CodeSet, load_manifest
from stages import data as data_stage
from stages import evaluate, sample, stage1, stage2
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple:
    """One short stage 1 streamed from 200 PNGs in 2 class folders (decoding in 2 DataLoader workers, which
    stage 2 and evaluate then use too: stage 1's data settings), and a copy whose checkpoints say
    data.streaming=never (the same model, its data decoded up front); stage 2 run in both."""
    tmp_path = tmp_path_factory.mktemp("streamed_stages")
    images = png_folder(tmp_path / "images", 200)
    streamed, cached = tmp_path / "streamed", tmp_path / "cached"
    data = ["data.source=folder", f"data.path={images}", "data.image_size=16", "data.streaming=always",
            "data.num_workers=2"]
    assert run(stage1, streamed, *data, *SHORT) == 0
    shutil.copytree(streamed, cached)
    decode_up_front(cached)
    assert run(stage2, streamed, *SHORT) == 0
    assert run(stage2, cached, *SHORT) == 0
    return streamed, cached


def test_stage2_extracts_the_same_codes_from_a_streamed_folder_without_a_data_cache(runs):
    streamed, cached = runs
    assert not (streamed / "data" / "cache").exists()  # nothing decoded up front
    assert (cached / "data" / "cache").is_dir()  # the control: this path does decode into the cache
    for split, n in (("train", 180), ("holdout", 20)):
        (s_codes, s_labels), (c_codes, c_labels) = codes_of(streamed, split), codes_of(cached, split)
        assert len(s_labels) == n and set(s_labels.tolist()) == {0, 1}
        np.testing.assert_array_equal(s_labels, c_labels)
        for s, c in zip(s_codes, c_codes):
            np.testing.assert_array_equal(s, c)  # same files, same decoding, same batches: the same argmin


def numbers(report, prefix="") -> dict[str, float]:
    """Every number of a report by its path, but timings (seconds, and the feature extractors' images/s)."""
    if isinstance(report, dict):
        return {k: v for key, x in report.items() if "seconds" not in key and key != "feature_speed"
                for k, v in numbers(x, f"{prefix}{key}.").items()}
    if isinstance(report, list):
        return {k: v for i, x in enumerate(report) for k, v in numbers(x, f"{prefix}{i}.").items()}
    is_number = isinstance(report, (int, float)) and not isinstance(report, bool)
    return {prefix.rstrip("."): float(report)} if is_number else {}


def test_evaluate_scores_a_streamed_run_as_the_decoded_one(runs, tmp_path):
    streamed, cached = runs
    for run_dir in runs:  # each its own statistics: streamed and decoded sets never share cached features
        assert run(sample, run_dir, "sample.num=30") == 0
        assert run(evaluate, run_dir, f"evaluate.reference_dir={tmp_path / 'reference'}") == 0
    assert not (streamed / "data" / "cache").exists()
    s, c = (numbers(json.loads((r / "eval" / "report.json").read_text())) for r in runs)
    assert s.keys() == c.keys() and "fid" in s and "real_floor.fid" in s
    tol = 32 * float(np.finfo(np.float32).eps)  # features are float32; the scores computed from them alike
    for key in s:
        assert s[key] == pytest.approx(c[key], rel=tol, abs=tol), key


def test_the_data_stage_lists_a_streamed_folder_without_decoding_it_into_a_cache(tmp_path):
    images = png_folder(tmp_path / "images", 40)
    run_dir = tmp_path / "run"
    assert run(data_stage, run_dir, "data.source=folder", f"data.path={images}", "data.image_size=16",
               "data.streaming=always") == 0
    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    assert (run_dir / "data" / "preview.png").is_file() and not (run_dir / "data" / "cache").exists()
    assert summary["images"] == {"train": 36, "holdout": 4} and "streamed from the files" in summary["holdout_source"]
