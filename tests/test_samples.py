"""Sample sets on disk (pipeline.samples): shards written per rank read back as one set in sample order."""

import json

import numpy as np
import pytest

from pipeline.io import UserError
from pipeline.samples import (
    MANIFEST,
    SINGLE,
    SampleSet,
    commit,
    load_sample_set,
    manifest_of,
    stored_array,
    write_shard,
)


def stream(n: int) -> dict[str, np.ndarray]:
    """n fake samples whose every array says which sample it is."""
    idx = np.arange(n)
    return {"images": np.broadcast_to(idx[:, None, None, None] % 256, (n, 4, 4, 1)).astype(np.uint8),
            "labels": idx % 10, "codes_top": np.broadcast_to(idx[:, None, None], (n, 2, 2)).copy()}


def write_set(folder, n: int, world: int, stamp: str = "s1") -> dict:
    """What ``world`` sampling ranks write: shard r holds samples r, r + world, ..., then rank 0's manifest."""
    full = stream(n)
    for rank in range(world):
        rows = slice(rank, n, world)
        write_shard(folder, rank, world, stamp, full["images"][rows], full["labels"][rows],
                    {"top": full["codes_top"][rows]}, {"seed": 0})
    commit(folder, manifest_of(n, world, stamp, {"seed": 0}, ["top"]))
    return full


@pytest.mark.parametrize("world", [1, 3])
def test_shards_read_back_in_sample_order(tmp_path, world):
    full = write_set(tmp_path, 11, world)
    samples = load_sample_set(tmp_path)
    assert len(samples) == 11 and samples.settings == {"seed": 0}
    asked = [7, 0, 10, 3, 3, 5]
    got = samples.take(asked)
    for key in ("images", "labels", "codes_top"):
        assert np.array_equal(got[key], full[key][asked]), key
    assert np.array_equal(samples.labels(), full["labels"])
    assert samples.take([])["images"].shape == (0, 4, 4, 1)
    mapped = stored_array(tmp_path / samples.manifest["shards"][-1], "images")  # rows are read, not the shard
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, full["images"][world - 1 :: world])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([MANIFEST, SINGLE] if world == 1 else [MANIFEST, *(
        f"shard-{r:05d}-of-00003.npz" for r in range(3))])


def test_a_new_sampling_replaces_the_shards_of_the_last(tmp_path):
    write_set(tmp_path, 9, world=3, stamp="old")
    full = write_set(tmp_path, 5, world=2, stamp="new")
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["shard-00000-of-00002.npz", "shard-00001-of-00002.npz"]
    assert np.array_equal(load_sample_set(tmp_path).take(range(5))["codes_top"], full["codes_top"])
    write_set(tmp_path, 4, world=1, stamp="one")
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [SINGLE]


def test_a_shard_of_another_sampling_is_refused(tmp_path):
    """An interrupted sampling that overwrote one shard before its manifest must not mix into the old set."""
    write_set(tmp_path, 6, world=2, stamp="old")
    full = stream(6)
    write_shard(tmp_path, 1, 2, "new", full["images"][1::2], full["labels"][1::2], {"top": full["codes_top"][1::2]},
                {})
    samples = load_sample_set(tmp_path)
    assert samples.take([0, 2])["labels"].tolist() == [0, 2]  # shard 0 is still the set's
    with pytest.raises(UserError, match="shard-00001-of-00002.npz is not part of the sample set"):
        samples.take([1])
    with pytest.raises(UserError, match="is not part of the sample set"):
        samples.check()
    (tmp_path / "shard-00001-of-00002.npz").write_bytes(b"cut short")
    with pytest.raises(UserError, match="shard-00001-of-00002.npz of the sample set in .* is missing or damaged"):
        samples.check()


def test_a_folder_from_before_manifests_reads_as_one_shard(tmp_path):
    full = stream(4)
    np.savez_compressed(tmp_path / SINGLE, images=full["images"], labels=full["labels"], codes_top=full["codes_top"],
             codes_bottom=full["codes_top"], settings=np.asarray(json.dumps({"temperature": 0.9})))
    samples = load_sample_set(tmp_path)
    assert isinstance(samples, SampleSet) and len(samples) == 4 and samples.settings == {"temperature": 0.9}
    assert samples.manifest["levels"] == ["top", "bottom"]
    assert np.array_equal(samples.take([3, 1])["codes_bottom"], full["codes_top"][[3, 1]])
    assert stored_array(tmp_path / SINGLE, "images") is None  # compressed: read whole, as before
    assert load_sample_set(tmp_path / "nothing") is None
