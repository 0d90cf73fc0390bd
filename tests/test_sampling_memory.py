"""The key/value cache of sampling: its size computed from the shapes equals the cache tensors' bytes, and
``sample.max_kv_gib`` lowers the batch so the cache fits, without changing any image."""

import pytest
import torch

from pipeline.config import GPTPriorConfig, PixelCNNPriorConfig, VQVAEConfig, load_config
from pipeline.io import UserError
from pipeline.priors import Decoding, prior_from_spec, prior_spec
from pipeline.sampler import Sampler
from pipeline.sampling import image_uniforms, kv_cache_bytes, sample_level
from tests.conftest import assert_same_draws

K, C = 8, 3
TINY = GPTPriorConfig(n_layer=2, n_embd=16, n_head=2)


def cache_nbytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def fed_cache(prior, batch: int, labels, cond, kv_cache: str = "dynamic"):
    """The cache after every position is fed (as at the end of sampling a grid)."""
    with torch.no_grad():
        state = prior.begin(batch, labels, cond, decoding=Decoding(kv_cache))
        prev = None
        for t in range(prior.seq_len):
            prev = prior.step(state, t, prev).argmax(-1)
    return state.past


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch,window,dtype", [("gpt2", 0, torch.float32), ("llama", 0, torch.float32),
                                                ("gpt2", 3, torch.float32), ("gpt2", 0, torch.bfloat16)])
def test_kv_cache_bytes_are_the_cache_tensors_bytes(arch, window, dtype, kv_cache):
    """The budget's formula against the real tensors of both caches (the static one holds them from the first
    step on, preallocated to every position)."""
    net = GPTPriorConfig(arch=arch, n_layer=2, n_embd=16, n_head=2)
    prior = prior_from_spec(prior_spec(net, (3, 4), K, C, (2, 2), K, window)).eval().to(dtype)
    cond = torch.randint(0, K, (5, 2, 2))
    cache = fed_cache(prior, 5, torch.arange(5) % (C + 1), cond, kv_cache)
    assert cache_nbytes(cache) == kv_cache_bytes(prior, 5)
    prefix = 0 if window else 4
    assert kv_cache_bytes(prior, 5) == 2 * 2 * 5 * (prefix + 12) * 16 * dtype.itemsize  # the formula, written out
    guided = fed_cache(prior, 10, torch.cat([torch.arange(5) % C, torch.full((5,), C)]), torch.cat([cond, cond]),
                       kv_cache)
    assert cache_nbytes(guided) == kv_cache_bytes(prior, 5, guided=True)  # guidance doubles the rows


def test_a_pixelcnn_has_no_growing_cache():
    net = PixelCNNPriorConfig(channels=8, layers=2, kernel_size=3, cond_channels=8, cond_res_blocks=1)
    assert kv_cache_bytes(prior_from_spec(prior_spec(net, (4, 4), K, C, (2, 2), K)), 100, guided=True) == 0


@pytest.fixture(scope="module")
def sampler() -> Sampler:
    torch.manual_seed(0)
    vq = VQVAEConfig(levels=2, channels=16, res_channels=8, res_blocks=1, codebook_size=K, code_dim=8)
    specs = [prior_spec(TINY, (2, 2), K, C, None, 0), prior_spec(TINY, (4, 4), K, C, (2, 2), K)]
    return Sampler(vq, 1, 16, [prior_from_spec(s) for s in specs], ["top", "bottom"], specs).eval()


def test_max_kv_gib_picks_the_largest_batch_that_fits_and_keeps_the_images(sampler):
    bottom = kv_cache_bytes(sampler.priors[1], 1)  # the larger of the two levels (1 + 4 + 15 positions)
    assert bottom > kv_cache_bytes(sampler.priors[0], 1)
    budget = 3.5 * bottom / 2**30
    assert sampler.kv_batch_size(250, budget, guided=False) == 3
    assert sampler.kv_batch_size(250, budget, guided=True) == 1
    assert sampler.kv_batch_size(2, budget, guided=False) == 2  # never above batch_size
    assert sampler.kv_batch_size(250, 0, guided=True) == 250  # 0 = off
    with pytest.raises(UserError) as err:
        sampler.kv_batch_size(250, 0.5 * bottom / 2**30, guided=True)
    assert str(err.value).startswith("max_kv_gib=") and "too small" in str(err.value) and "\n" not in str(err.value)
    whole = sampler.generate_samples(7, labels="uniform", guidance=2.0, seed=4, batch_size=7)
    limited = sampler.generate_samples(7, labels="uniform", guidance=2.0, seed=4, batch_size=7, max_kv_gib=budget)
    assert_same_draws(whole.codes, limited.codes)


def test_max_kv_gib_is_checked():
    with pytest.raises(ValueError, match=r"sample.max_kv_gib=-1.0 is not allowed"):
        load_config("configs/smoke.yaml", ["sample.max_kv_gib=-1"])


def test_guided_sampling_uses_the_doubled_batch_the_budget_assumes(sampler):
    """The rule the budget doubles by (is_guided) is the one sample_level follows: a guided level's cache holds
    2B rows."""
    prior, labels = sampler.priors[0], torch.tensor([0, 1])
    seen = []
    begin = prior.begin
    prior.begin = lambda batch, *a, **k: (seen.append(batch), begin(batch, *a, **k))[1]
    try:
        sample_level(prior, image_uniforms(0, 0, range(2), prior.seq_len), labels, guidance=2.0)
        sample_level(prior, image_uniforms(0, 0, range(2), prior.seq_len), labels, guidance=1.0)
    finally:
        del prior.begin
    assert seen == [4, 2]


def test_bfloat16_sampling_halves_the_cache_and_exports_float32(sampler):
    """sample.dtype=bfloat16 samples with bfloat16 copies: the budget fits twice the images, the draws are valid
    codes, and the sampler's own (exported) weights stay float32."""
    budget = 3.5 * kv_cache_bytes(sampler.priors[1], 1) / 2**30  # 3 float32 images
    assert sampler.kv_batch_size(250, budget, False, "bfloat16") == 7
    out = sampler.generate_samples(5, labels="uniform", guidance=2.0, seed=1, dtype="bfloat16", max_kv_gib=budget)
    assert [c.shape for c in out.codes] == [(5, 2, 2), (5, 4, 4)] and all(c.max() < K for c in out.codes)
    assert out.images.shape == (5, 16, 16, 1)
    assert all(p.dtype == torch.float32 for p in sampler.parameters())
    with pytest.raises(UserError, match="dtype='float16' is not a sampling dtype; choose one of float32, bfloat16"):
        sampler.generate_samples(1, dtype="float16")
    with pytest.raises(ValueError, match="sample.dtype='half' is not allowed: choose one of float32, bfloat16"):
        load_config("configs/smoke.yaml", ["sample.dtype=half"])
