"""GPTPrior: token layout, causality, conditioning, cached vs uncached sampling, trainability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.priors.gpt import GPTPrior
from pipeline.sampling import image_uniforms, sample_level
from tests.conftest import assert_same_draws, rounding_tolerance

K, KC, C = 16, 12, 3
GRID, COND_GRID = (4, 4), (2, 3)
TINY = dict(n_layer=2, n_embd=32, n_head=4)


def make_prior(arch: str = "gpt2", bottom: bool = True, num_classes: int = C, seed: int = 0) -> GPTPrior:
    torch.manual_seed(seed)
    if bottom:
        prior = GPTPrior(GRID, K, num_classes, cond_grid=COND_GRID, cond_num_codes=KC, arch=arch, **TINY)
    else:
        prior = GPTPrior(GRID, K, num_classes, arch=arch, **TINY)
    return prior.eval()


def make_batch(batch: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (batch, *GRID), generator=g)
    top = torch.randint(0, KC, (batch, *COND_GRID), generator=g)
    labels = torch.randint(0, C + 1, (batch,), generator=g)  # includes the null label C
    return codes, labels, top


def teacher_forced_steps(prior: GPTPrior, codes, labels, top, use_cache: bool) -> torch.Tensor:
    state = prior.begin(codes.shape[0], labels, top, use_cache=use_cache)
    flat = codes.reshape(codes.shape[0], -1)
    out, prev = [], None
    for t in range(prior.seq_len):
        out.append(prior.step(state, t, prev))
        prev = flat[:, t]
    return torch.stack(out, dim=1)


def test_layout_and_config():
    prior = make_prior()
    cfg = prior.model.config
    assert prior.vocab_size == K + KC + C + 1
    assert prior.null_token == K + KC + C
    assert cfg.n_positions == 1 + 6 + 16 - 1  # [class] + top prefix + codes, minus the never-fed last code
    assert cfg.pad_token_id is None or cfg.pad_token_id != prior.null_token
    assert cfg._attn_implementation == "sdpa"
    assert prior.num_parameters() == sum(p.numel() for p in prior.parameters())
    llama = make_prior("llama")
    assert llama.model.config.max_position_embeddings == cfg.n_positions
    assert llama.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@torch.no_grad()
def test_forward_shape_and_causality(arch):
    prior = make_prior(arch)
    codes, labels, top = make_batch()
    logits = prior(codes, labels, top)
    assert logits.shape == (4, 16, K)
    tol = rounding_tolerance(logits)
    for t in (0, 5, 15):
        changed = codes.clone().view(4, -1)
        changed[:, t] = (changed[:, t] + 1) % K
        other = prior(changed.view(codes.shape), labels, top)
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=tol)
        if t + 1 < 16:
            assert (other[:, t + 1] - logits[:, t + 1]).abs().max() > 100 * tol  # the next position sees it


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@torch.no_grad()
def test_top_codes_and_label_condition_every_position(arch):
    prior = make_prior(arch)
    codes, labels, top = make_batch()
    logits = prior(codes, labels, top)
    tol = rounding_tolerance(logits)
    other_top = (top + 1) % KC
    diff = (prior(codes, labels, other_top) - logits).abs().amax(dim=-1)  # (B, T)
    assert (diff > tol).all()
    other_labels = (labels + 1) % (C + 1)
    diff = (prior(codes, other_labels, top) - logits).abs().amax(dim=-1)
    assert (diff > tol).all()


@torch.no_grad()
def test_unconditional_prior_ignores_labels_and_needs_cond_codes():
    prior = make_prior(bottom=False, num_classes=0)
    codes, labels, top = make_batch()
    torch.testing.assert_close(prior(codes, None), prior(codes, labels))
    bottom = make_prior()
    with pytest.raises(ValueError, match="cond_codes"):
        bottom(codes, labels, None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_forward_matches_step(arch, use_cache):
    prior = make_prior(arch)
    codes, labels, top = make_batch()
    stepped = teacher_forced_steps(prior, codes, labels, top, use_cache)
    torch.testing.assert_close(stepped, prior(codes, labels, top), rtol=1e-4, atol=1e-5)


def test_cache_is_a_transformers_cache():
    from transformers import Cache

    prior = make_prior()
    _, labels, top = make_batch()
    with torch.no_grad():
        state = prior.begin(4, labels, top, use_cache=True)
    assert isinstance(state.past, Cache)
    assert state.past.get_seq_length() == prior.prefix_len


@pytest.mark.filterwarnings("error::FutureWarning")  # e.g. transformers' deprecation of past_key_values
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampling_with_and_without_cache_identical(arch):
    prior = make_prior(arch)
    _, labels, top = make_batch(6)
    u = image_uniforms(7, 1, range(6), prior.seq_len)
    for kw in (dict(), dict(top_k=5, temperature=0.8), dict(top_p=0.9, guidance=2.0)):
        a = sample_level(prior, u, labels, top, use_cache=True, **kw)
        b = sample_level(prior, u, labels, top, use_cache=False, **kw)
        assert a.shape == (6, *GRID)
        assert_same_draws(a, b)  # the cache changes the float computation, not the draws


def test_step_order_is_checked():
    prior = make_prior()
    _, labels, top = make_batch()
    with torch.no_grad():
        state = prior.begin(4, labels, top)
        prior.step(state, 0, None)
        with pytest.raises(ValueError, match="t=2"):
            prior.step(state, 2, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_reduces_cross_entropy(arch):
    prior = make_prior(arch).train()
    codes, labels, top = make_batch(8)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)

    def loss_fn() -> torch.Tensor:
        logits = prior(codes, labels, top)
        return F.cross_entropy(logits.reshape(-1, K), codes.reshape(-1))

    first = loss_fn().item()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.8 * first


def test_bad_arguments():
    with pytest.raises(ValueError, match="'bert'"):
        GPTPrior(GRID, K, arch="bert")
    with pytest.raises(ValueError, match="n_head"):
        GPTPrior(GRID, K, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="cond_num_codes"):
        GPTPrior(GRID, K, cond_grid=COND_GRID)
