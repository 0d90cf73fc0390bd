"""Sample-quality metrics from sums that add across ranks (pipeline.metrics.moments): the same numbers as the
metrics computed from all features at once, whatever way the rows are split."""

import json

import numpy as np
import pytest
import torch

from pipeline.metrics import fid_from_features, inception_score_from_logits
from pipeline.metrics.moments import (
    Moments,
    ScoreSums,
    fid_from_moments,
    inception_score_from_sums,
    split_of,
)

F64 = torch.finfo(torch.float64).eps


def moments_in_parts(x: np.ndarray, parts: int) -> Moments:
    """What ``parts`` ranks holding rows r, r + parts, ... accumulate and all_reduce gives."""
    total = Moments.zeros(x.shape[1])
    for r in range(parts):
        m = Moments.zeros(x.shape[1])
        m.add(torch.from_numpy(x[r::parts]))
        for t, u in zip(total.tensors(), m.tensors()):
            t += u
    return total


def test_fid_from_moments_is_fid_from_features():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8)).astype(np.float32)
    fake = (rng.normal(size=(200, 8)) * 1.3 + 0.4).astype(np.float32)
    expected = fid_from_features(real, fake)
    for parts in (1, 3):
        got = fid_from_moments(moments_in_parts(real, parts), moments_in_parts(fake, parts))
        assert got == pytest.approx(expected, rel=1e4 * F64)  # summation order only: float64 rounding
    assert expected > 0.5  # the sets differ: a mix-up of real and fake rows would not give the same number
    assert fid_from_moments(moments_in_parts(real, 2), moments_in_parts(real, 3)) == pytest.approx(0, abs=1e-9)


def test_inception_score_from_sums_is_the_score_of_contiguous_splits():
    logits = torch.from_numpy(np.random.default_rng(1).normal(size=(103, 7)) * 3)
    one = ScoreSums.zeros(1, 7)
    one.add(logits, split_of(np.arange(103), 103, 1))
    expected = inception_score_from_logits(logits, splits=1)[0]  # one split: torchmetrics' shuffle changes nothing
    assert inception_score_from_sums(one) == (pytest.approx(expected, rel=1e3 * F64), 0.0)

    assert split_of(np.arange(10), 10, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    sums, splits = ScoreSums.zeros(4, 7), split_of(np.arange(103), 103, 4)
    for r in range(2):  # two ranks' rows, each split of its rows' indices
        sums.add(logits[r::2], splits[r::2])
    p = torch.softmax(logits, 1).numpy()
    per_split = [np.exp((q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean())
                 for q in np.split(p, [25, 51, 77])]  # floor(s * 103 / 4): 0, 25, 51, 77, 103
    mean, std = inception_score_from_sums(sums)
    assert mean == pytest.approx(np.mean(per_split), rel=1e3 * F64)
    assert std == pytest.approx(np.std(per_split, ddof=1), rel=1e6 * F64)


class OneRank:
    """The part of Fabric the reductions use, for a single process."""

    global_rank, world_size, device = 0, 1, torch.device("cpu")

    def broadcast(self, obj, src=0):
        return obj

    def to_device(self, x):
        return x


def toy_extractor(pixels: torch.Tensor):
    """uint8 (B, 1, 2, 2) -> features (B, 4) and logits (B, 3) that depend on the image only."""
    f = pixels.reshape(len(pixels), -1).float()
    return f, f[:, :3] * 0.1


def test_reduce_features_keeps_the_first_features_and_every_prediction():
    from pipeline.metrics.reduced import reduce_features

    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 255, (37, 1, 2, 2), dtype=np.uint8))
    out = reduce_features(OneRank(), toy_extractor, lambda chunk: pixels[chunk], 37, batch_size=5, keep=12)
    feats, logits = toy_extractor(pixels)
    assert np.array_equal(out.features, feats[:12].numpy())  # images 0..11 in order, whatever the batches
    assert np.array_equal(out.predicted, logits.argmax(1).numpy())
    mean, cov = out.moments.mean_cov()
    assert torch.allclose(mean, feats.double().mean(0), rtol=1e3 * F64)
    assert torch.allclose(cov, torch.cov(feats.double().T), rtol=1e6 * F64, atol=1e6 * F64 * float(cov.abs().max()))
    assert int(out.scores.count.sum()) == 37


def test_cached_statistics_are_read_only_for_the_same_provenance(tmp_path):
    """The shared reference cache: the same provenance reads the file; another provenance, or a file whose stored
    provenance was changed under the same name, recomputes (never a silent reuse)."""
    from pipeline.metrics.reduced import cache_path, cached_reduction, reduce_features

    pixels = torch.from_numpy(np.random.default_rng(3).integers(0, 255, (20, 1, 2, 2), dtype=np.uint8))
    calls, lines = [], []

    def compute():
        calls.append(1)
        return reduce_features(OneRank(), toy_extractor, lambda chunk: pixels[chunk], 20, 8, 20)

    prov = {"data": "sig", "split": "train", "seed": 0, "n": 20, "extractor": "toy", "weights_sha256": "abc"}
    first = cached_reduction(OneRank(), tmp_path, prov, compute, log=lines.append)
    again = cached_reduction(OneRank(), tmp_path, prov, compute, log=lines.append)
    assert len(calls) == 1 and lines == [f"toy: statistics of 20 train images read from "
                                         f"{cache_path(tmp_path, {**prov, 'format': 1})}"]
    assert np.array_equal(again.features, first.features) and np.array_equal(again.predicted, first.predicted)
    assert torch.equal(again.moments.outer, first.moments.outer) and torch.equal(again.scores.probs,
                                                                                  first.scores.probs)
    cached_reduction(OneRank(), tmp_path, {**prov, "weights_sha256": "other"}, compute, log=lines.append)
    assert len(calls) == 2

    path = cache_path(tmp_path, {**prov, "format": 1})
    with np.load(path) as z:
        arrays = dict(z)
    arrays["provenance"] = np.asarray(json.dumps({**prov, "format": 1, "seed": 1}, sort_keys=True))
    np.savez(path, **arrays)  # the same name, another provenance inside
    cached_reduction(OneRank(), tmp_path, prov, compute, log=lines.append)
    assert len(calls) == 3 and len(lines) == 1
    path.write_bytes(b"not an npz")  # a damaged file: a warning, then computed again (on every rank alike)
    cached_reduction(OneRank(), tmp_path, prov, compute, log=lines.append)
    assert len(calls) == 4 and lines[-1].startswith(f"warning: {path} unreadable")
