"""One contract, run for every prior kind (like diffusers' model tester mixins): causality, conditioning on labels
and on the level above, step-by-step logits equal to the teacher-forced forward with and without the cache,
the same draws with and without the cache, and a save/load round trip through the spec. The kind-specific
details (the PixelCNN's blind spot, the GPT's prefix) are in test_pixelcnn.py and test_gpt_prior.py."""

import pytest
import torch

from pipeline.config import load_config
from pipeline.priors import build_prior, prior_from_spec, prior_spec
from pipeline.sampling import image_uniforms, sample_level
from tests.conftest import assert_same_draws, rounding_tolerance

K, KC, C = 7, 5, 3  # codes of the modelled level, of the level above, classes
GRID, COND = (3, 4), (2, 2)
TINY = {"gpt": ["prior.top.n_layer=2", "prior.top.n_embd=16", "prior.top.n_head=2"],
        "pixelcnn": ["prior.top.kind=pixelcnn", "prior.top.channels=8", "prior.top.layers=3",
                     "prior.top.kernel_size=3", "prior.top.cond_channels=8", "prior.top.cond_res_blocks=1"]}
TINY["gpt-window"] = TINY["gpt"]  # a GPT conditioned on the 3 x 3 window of upper codes around each code (no prefix)
WINDOW = {"gpt-window": 3}


def spec_of(kind: str) -> dict:
    net = load_config("configs/smoke.yaml", TINY[kind]).prior.top
    return prior_spec(net, GRID, K, C, COND, KC, WINDOW.get(kind, 0))


def make(kind: str):
    torch.manual_seed(0)
    return prior_from_spec(spec_of(kind)).eval()


def batch(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, K, (n, *GRID), generator=g), torch.randint(0, C, (n,), generator=g),
            torch.randint(0, KC, (n, *COND), generator=g))


KINDS = ["gpt", "pixelcnn", "gpt-window"]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_causality(kind):
    prior = make(kind)
    codes, labels, cond = batch()
    base = prior(codes, labels, cond)
    tol = rounding_tolerance(base)
    for t in (0, 3, 5, 11):
        changed = codes.clone().view(3, -1)
        changed[:, t] = (changed[:, t] + 1) % K
        out = prior(changed.view(codes.shape), labels, cond)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=tol)
        if t + 1 < prior.seq_len:
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 10 * tol  # the next position sees it


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_labels_and_the_level_above_condition_the_logits(kind):
    prior = make(kind)
    codes, labels, cond = batch()
    base = prior(codes, labels, cond)
    tol = rounding_tolerance(base)
    assert (prior(codes, (labels + 1) % C, cond) - base).abs().max() > 100 * tol
    assert (prior(codes, labels, (cond + 1) % KC) - base).abs().max() > 100 * tol
    null = prior(codes, prior.null_labels(3, codes.device), cond)
    torch.testing.assert_close(prior(codes, None, cond), null, rtol=0, atol=tol)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_steps_equal_the_forward(kind, use_cache):
    prior = make(kind)
    codes, labels, cond = batch()
    full = prior(codes, labels, cond)
    state = prior.begin(3, labels, cond, use_cache=use_cache)
    flat = codes.flatten(1)
    steps = torch.stack([prior.step(state, t, None if t == 0 else flat[:, t - 1]) for t in range(prior.seq_len)], 1)
    torch.testing.assert_close(steps, full, rtol=0, atol=rounding_tolerance(full, ulps=256))


@pytest.mark.parametrize("kind", KINDS)
def test_cache_changes_no_draw(kind):
    prior = make(kind)
    _, labels, cond = batch(6)
    u = image_uniforms(3, 1, range(6), prior.seq_len)
    for kw in ({}, {"top_k": 3, "temperature": 0.8}, {"top_p": 0.9, "guidance": 2.0}):
        a = sample_level(prior, u, labels, cond, use_cache=True, **kw)
        b = sample_level(prior, u, labels, cond, use_cache=False, **kw)
        assert a.shape == (6, *GRID) and a.min() >= 0 and a.max() < K
        assert_same_draws(a, b)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_save_and_load_through_the_spec(kind):
    prior = make(kind)
    spec = spec_of(kind)
    kind = kind.split("-")[0]
    assert spec["net"]["kind"] == kind and ("n_layer" in spec["net"]) == (kind == "gpt")  # only its own fields
    again = prior_from_spec(spec)
    again.load_state_dict(prior.state_dict(), strict=True)
    codes, labels, cond = batch()
    assert torch.equal(again.eval()(codes, labels, cond), prior(codes, labels, cond))  # the same computation
    net = load_config("configs/smoke.yaml", TINY[kind]).prior.top
    assert type(build_prior(net, GRID, K, C, COND, KC)) is type(prior)
