"""Shared sampling loop: truncation (temperature, top-k, top-p), inverse-CDF draws, seeding, conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.priors.base import Prior
from pipeline.priors.gpt import GPTPrior
from pipeline.sampling import filter_logits, image_uniforms, sample_level, sample_token
from tests.conftest import assert_same_draws

K, C = 16, 3
GRID = (3, 4)


def tiny_prior(num_classes: int = C, seed: int = 0) -> GPTPrior:
    torch.manual_seed(seed)
    return GPTPrior(GRID, K, num_classes, n_layer=2, n_embd=32, n_head=4).eval()


class TablePrior(Prior):
    """Fake prior with fixed logits per (label, position), ignoring previous codes."""

    def __init__(self, table: torch.Tensor) -> None:  # (C + 1, T, K)
        super().__init__(GRID, num_codes=table.shape[-1], num_classes=table.shape[0] - 1)
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, codes, labels=None, cond_codes=None):
        labels = self.null_labels(codes.shape[0], codes.device) if labels is None else labels
        return self.table[labels]

    def begin(self, batch, labels, cond_codes, use_cache=True, decoding=None):
        return self.null_labels(batch, self.table.device) if labels is None else labels

    def step(self, state, t, prev):
        return self.table[state, t]


@torch.no_grad()
def greedy(prior: Prior, batch: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax decoding with teacher-forced full forwards (independent of begin/step)."""
    codes = torch.zeros(batch, *prior.grid, dtype=torch.long)
    flat = codes.view(batch, -1)
    for t in range(prior.seq_len):
        flat[:, t] = prior(codes, labels)[:, t].argmax(-1)
    return codes


def uniforms(prior: Prior, n: int, seed: int = 0) -> torch.Tensor:
    return image_uniforms(seed, 0, range(n), prior.seq_len)


# ------------------------------------------------------------------------------------------ greedy limits


def test_top_k_1_is_greedy():
    prior = tiny_prior()
    labels = torch.tensor([0, 1, 2, 3, 0])
    out = sample_level(prior, uniforms(prior, 5), labels, top_k=1)
    assert_same_draws(out, greedy(prior, 5, labels))  # step by step vs full forwards: argmax within rounding


def test_tiny_temperature_is_greedy():
    prior = tiny_prior()
    labels = torch.tensor([0, 1, 2, 3, 0])
    out = sample_level(prior, uniforms(prior, 5), labels, temperature=1e-4)
    assert_same_draws(out, greedy(prior, 5, labels))


def test_greedy_on_fixed_table():
    table = torch.randn(C + 1, 12, K, generator=torch.Generator().manual_seed(3))
    prior = TablePrior(table)
    labels = torch.tensor([0, 1, 2, 3])
    expected = table[labels].argmax(-1).view(4, *GRID)
    for kw in (dict(top_k=1), dict(temperature=1e-4), dict(top_p=1e-6)):
        assert torch.equal(sample_level(prior, uniforms(prior, 4), labels, **kw), expected), kw


# ------------------------------------------------------------------------------------------ filter_logits


@pytest.mark.parametrize("top_k", [1, 3, 10, 16, 40])
def test_top_k_keeps_exactly_the_top_k(top_k):
    logits = torch.randn(32, 16, generator=torch.Generator().manual_seed(top_k))
    kept = filter_logits(logits, top_k=top_k).isfinite()
    expected = torch.zeros_like(kept).scatter(-1, logits.topk(min(top_k, 16), dim=-1).indices, True)
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_top_p_keeps_the_smallest_nucleus(top_p):
    logits = 2 * torch.randn(32, 16, generator=torch.Generator().manual_seed(int(top_p * 100)))
    kept = filter_logits(logits, top_p=top_p).isfinite()
    probs = logits.softmax(-1)
    for row in range(32):
        order = probs[row].argsort(descending=True)
        cum = probs[row][order].cumsum(0)
        n = int((cum < top_p).sum()) + 1 if top_p < 1 else 16  # smallest prefix with mass >= top_p
        expected = torch.zeros(16, dtype=torch.bool)
        expected[order[:n]] = True
        assert torch.equal(kept[row], expected), row
        assert probs[row][kept[row]].sum() >= top_p - 1e-6


def test_top_k_then_top_p_renormalises_within_top_k():
    logits = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    filtered = filter_logits(logits, top_k=6, top_p=0.7)
    kept = filtered.isfinite()
    top6 = torch.zeros_like(kept).scatter(-1, logits.topk(6, dim=-1).indices, True)
    assert (kept <= top6).all() and (kept.sum(-1) >= 1).all()
    assert (filtered[kept].softmax(-1) > 0).all()
    # nucleus of the renormalised top-6 distribution has mass >= 0.7
    probs = filter_logits(logits, top_k=6).softmax(-1)
    assert ((probs * kept).sum(-1) >= 0.7 - 1e-6).all()


def test_temperature_scales_logits():
    logits = torch.randn(4, 16)
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)


# ------------------------------------------------------------------------------------------ sample_token


def test_sample_token_never_picks_a_removed_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g)
    edge = torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-7, 0.99999999, 1.0])  # 0.99999999 rounds to 1.0 in float32
    for top_k, top_p in ((1, 1.0), (3, 1.0), (0, 0.3), (5, 0.8), (0, 1e-6)):
        filtered = filter_logits(logits, top_k=top_k, top_p=top_p)
        for u in [torch.rand(64, generator=g) for _ in range(20)] + [e.expand(64) for e in edge]:
            idx = sample_token(filtered, u)
            assert filtered.gather(-1, idx[:, None]).isfinite().all()
    # only the first / only the last / one middle token allowed
    masked = torch.full((3, 8), float("-inf"))
    masked[0, 0] = masked[1, 7] = masked[2, 4] = 0.0
    for e in edge:
        assert sample_token(masked, e.expand(3)).tolist() == [0, 7, 4]


def test_sample_token_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.0, 0.6, 0.3]]))
    u = torch.tensor([0.05, 0.1001, 0.5, 0.6999, 0.7001, 0.95])
    out = sample_token(logits.expand(6, 4), u)
    assert out.tolist() == [0, 2, 2, 2, 3, 3]


# ------------------------------------------------------------------------------------------ seeding


def test_same_seed_same_codes_whatever_the_batch_size():
    prior = tiny_prior()
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    seed, level = 123, 0
    T = prior.seq_len
    full = sample_level(prior, image_uniforms(seed, level, range(6), T), labels, top_p=0.95)
    part_a = sample_level(prior, image_uniforms(seed, level, range(0, 2), T), labels[:2], top_p=0.95)
    part_b = sample_level(prior, image_uniforms(seed, level, range(2, 6), T), labels[2:], top_p=0.95)
    assert torch.equal(full, torch.cat([part_a, part_b]))
    other = sample_level(prior, image_uniforms(seed + 1, level, range(6), T), labels, top_p=0.95)
    assert not torch.equal(full, other)
    assert torch.equal(image_uniforms(seed, level, [4], 12), image_uniforms(seed, level, range(6), 12)[4:5])
    assert not torch.equal(image_uniforms(seed, 0, [0], 12), image_uniforms(seed, 1, [0], 12))


# ------------------------------------------------------------------------------------------ conditioning


def test_class_conditioning_reaches_the_output():
    prior = tiny_prior().train()
    # a few optimisation steps on class-dependent data: label y (or the null label C) uses codes 4y .. 4y + 3
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(C + 1).repeat(8)
    codes = 4 * labels[:, None, None] + torch.randint(0, 4, (labels.shape[0], *GRID), generator=g)
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(prior(codes, labels).reshape(-1, K), codes.reshape(-1)).backward()
        opt.step()
    prior.eval()
    u = image_uniforms(9, 0, range(4), prior.seq_len)
    out = {y: sample_level(prior, u, torch.full((4,), y)) for y in range(C + 1)}
    for y in range(1, C + 1):
        assert not torch.equal(out[0], out[y]), y
    # classifier-free guidance changes the samples and guidance 1 is plain conditional sampling
    guided = sample_level(prior, u, torch.full((4,), 1), guidance=3.0)
    assert not torch.equal(guided, out[1])
    assert torch.equal(sample_level(prior, u, torch.full((4,), 1), guidance=1.0), out[1])
    assert (out[1] // 4 == 1).float().mean() > 0.5  # mostly the codes of class 1


def test_guidance_mixes_conditional_and_null_logits():
    table = torch.zeros(C + 1, 12, K)
    table[1, :, 2] = 1.0  # class 1 favours code 2 a little
    table[C, :, 5] = 1.0  # the null label favours code 5
    prior = TablePrior(table)
    u = image_uniforms(0, 0, range(2), 12)
    # guidance 3: logits = null + 3 * (cond - null) -> code 2: +3, code 5: -2; top_k=1 picks code 2 everywhere
    out = sample_level(prior, u, torch.tensor([1, 1]), guidance=3.0, top_k=1)
    assert (out == 2).all()
    out = sample_level(prior, u, torch.tensor([1, 1]), guidance=0.0, top_k=1)  # pure null-label sampling
    assert (out == 5).all()


# ------------------------------------------------------------------------------------------ bad settings


@pytest.mark.parametrize(
    "kw, text",
    [
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_p=-0.2), "top_p=-0.2"),
        (dict(top_k=-3), "top_k=-3"),
        (dict(guidance=-1.0), "guidance=-1.0"),
    ],
)
def test_bad_settings_raise(kw, text):
    prior = tiny_prior()
    with pytest.raises(ValueError, match=text.replace(".", r"\.")):
        sample_level(prior, uniforms(prior, 2), torch.tensor([0, 1]), **kw)


def test_wrong_uniform_length_raises():
    prior = tiny_prior()
    with pytest.raises(ValueError, match="length 5"):
        sample_level(prior, torch.rand(2, 5), torch.tensor([0, 1]))


def test_rejection_keeps_the_most_typical_share_of_each_asked_class():
    from pipeline.rejection import asked_class_probability, candidates_for, select_accepted

    assert candidates_for(100, 0.25) == 400 and candidates_for(100, 1.0) == 100 and candidates_for(10, 0.3) == 34
    labels = np.array([0] * 8 + [1] * 4)
    prob = np.concatenate([np.linspace(0.1, 0.8, 8), np.linspace(0.5, 0.9, 4)])
    kept = select_accepted(prob, labels, 6)
    assert sorted(labels[kept].tolist()) == [0] * 4 + [1] * 2  # half of each class, as asked
    assert set(kept.tolist()) == {4, 5, 6, 7, 10, 11}  # the most probable half of each
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert np.allclose(asked_class_probability(logits, np.array([0, 1])), [0.7, 0.1])
    with pytest.raises(ValueError, match="accept=0"):
        candidates_for(10, 0)
