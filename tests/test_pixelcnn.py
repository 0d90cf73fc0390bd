"""Tests of the gated PixelCNN prior: causality, no blind spot, conditioning, step/forward consistency,
sampling through ``pipeline.sampling.sample_level`` and a short optimisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.priors.pixelcnn import GatedPixelCNN
from pipeline.sampling import image_uniforms, sample_level
from tests.conftest import rounding_tolerance

K = 7  # codes of the modelled level
KC = 5  # codes of the conditioning level
NUM_CLASSES = 3


def make(grid=(4, 4), layers=4, num_classes=0, cond_grid=None, seed=0, **kw) -> GatedPixelCNN:
    torch.manual_seed(seed)
    model = GatedPixelCNN(
        grid,
        K,
        num_classes=num_classes,
        cond_grid=cond_grid,
        cond_num_codes=KC if cond_grid else 0,
        channels=8,
        layers=layers,
        kernel_size=3,
        cond_channels=8,
        cond_res_blocks=1,
        **kw,
    )
    return model.eval()


def inputs(model: GatedPixelCNN, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.num_codes, (batch, *model.grid), generator=g)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g) if model.num_classes else None
    cond = torch.randint(0, KC, (batch, *model.cond_grid), generator=g) if model.cond_grid else None
    return codes, labels, cond


def test_attributes_and_shape():
    model = make(grid=(3, 5), num_classes=NUM_CLASSES, cond_grid=(2, 3))
    assert model.grid == (3, 5) and model.num_codes == K and model.num_classes == NUM_CLASSES
    assert model.cond_grid == (2, 3) and model.cond_num_codes == KC and model.seq_len == 15
    codes, labels, cond = inputs(model, batch=3)
    assert model(codes, labels, cond).shape == (3, 15, K)


@pytest.mark.parametrize("cond", [False, True])
def test_causality(cond):
    """Changing the code at t changes no logit at positions <= t."""
    model = make(grid=(4, 5), num_classes=NUM_CLASSES if cond else 0, cond_grid=(2, 3) if cond else None)
    codes, labels, cond_codes = inputs(model)
    W = model.grid[1]
    base = model(codes, labels, cond_codes)
    tol = rounding_tolerance(base)
    for t in [0, 3, 4, 5, 9, 10, 14, 19]:  # first / last of rows and interior positions
        changed = codes.clone()
        r, c = divmod(t, W)
        changed[:, r, c] = (changed[:, r, c] + 1) % K
        out = model(changed, labels, cond_codes)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=tol)
        if t + 1 < model.seq_len:
            assert (out[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 100 * tol


def influence(model: GatedPixelCNN, t: int) -> torch.Tensor:
    """(H*W,) bool: which positions change the logits at position t when their code is changed alone. The changed
    grids run as one batch and the unchanged one alone, so "changed" means by more than float rounding."""
    H, W = model.grid
    codes, labels, cond = inputs(model, batch=1)
    n = H * W
    batch = codes.repeat(n, 1, 1).view(n, n)
    batch[torch.arange(n), torch.arange(n)] = (batch[torch.arange(n), torch.arange(n)] + 1) % K
    base = model(codes, labels, cond)[0, t]
    out = model(
        batch.view(n, H, W),
        None if labels is None else labels.repeat(n),
        None if cond is None else cond.repeat(n, 1, 1),
    )[:, t]
    return (out - base).abs().amax(-1) > rounding_tolerance(base)


def without_upper_right(model: GatedPixelCNN) -> GatedPixelCNN:
    """The classic blind spot: the vertical stack loses the columns right of the current one."""
    with torch.no_grad():
        for layer in model.blocks:
            layer.v_conv.weight[..., layer.pad + 1 :] = 0
    return model


@pytest.mark.parametrize("t", [15, 4, 6, 8, 11])
def test_no_blind_spot(t):
    """The receptive field of position t is exactly every earlier position in raster order, including the ones
    above and to the right (4x4 grid, kernel 3, 4 layers)."""
    model = make(grid=(4, 4), layers=4)
    seen = influence(model, t)
    assert seen[:t].all(), f"blind spot at positions {torch.nonzero(~seen[:t]).flatten().tolist()}"
    assert not seen[t:].any()


@pytest.mark.parametrize("t", [12, 6])  # (3, 0) and (1, 2): pixels above and to the right exist
def test_blind_spot_detector_finds_a_blind_spot(t):
    """The check above fails on a PixelCNN whose vertical stack misses the pixels above and to the right."""
    seen = influence(without_upper_right(make(grid=(4, 4), layers=4)), t)
    assert not seen[:t].all()


def test_no_blind_spot_gradient():
    """Same with the gradient of the last position's logits w.r.t. the input embedding."""
    model = make(grid=(4, 4), layers=4)
    codes, _, _ = inputs(model, batch=1)
    captured = {}

    def hook(_module, _inp, out):
        out.retain_grad()
        captured["emb"] = out

    handle = model.embed.register_forward_hook(hook)
    try:
        logits = model(codes)
    finally:
        handle.remove()
    logits[0, -1].square().sum().backward()
    grad = captured["emb"].grad[0].abs().sum(-1).flatten()  # (H*W,)
    tol = rounding_tolerance(grad)
    assert (grad[:-1] > 100 * tol).all()
    assert grad[-1] <= tol


def test_conditioning_is_used():
    model = make(grid=(4, 4), num_classes=NUM_CLASSES, cond_grid=(2, 2))
    codes, labels, cond = inputs(model)
    base = model(codes, labels, cond)
    tol = rounding_tolerance(base)
    # top codes change the bottom logits (everywhere, including position 0); one change of the top codes may leave a
    # position to ReLUs that are off for both, so every position must move under one of the KC - 1 changes
    diff = torch.stack([(model(codes, labels, (cond + s) % KC) - base).abs().amax(-1) for s in range(1, KC)])
    assert (diff.amax(0) > tol).all()
    # labels change the logits
    other_labels = (labels + 1) % NUM_CLASSES
    assert ((model(codes, other_labels, cond) - base).abs().amax(-1) > tol).all()
    # null label: explicit or None give the same logits, different from a real label
    null = model.null_labels(2, codes.device)
    out_null = model(codes, null, cond)
    torch.testing.assert_close(model(codes, None, cond), out_null)
    assert (out_null - base).abs().max() > tol
    # a bottom prior needs its top codes
    with pytest.raises(ValueError):
        model(codes, labels, None)
    with pytest.raises(ValueError):
        model(codes, torch.tensor([0, NUM_CLASSES + 1]), cond)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("cond", [False, True])
def test_step_matches_forward(use_cache, cond):
    """Teacher forcing: the logits of ``step`` equal those of ``forward`` on the same codes."""
    model = make(
        grid=(3, 5),
        layers=3,
        num_classes=NUM_CLASSES if cond else 0,
        cond_grid=(2, 3) if cond else None,
        dropout=0.1,
    )
    codes, labels, cond_codes = inputs(model, batch=3)
    with torch.no_grad():
        full = model(codes, labels, cond_codes)
        state = model.begin(3, labels, cond_codes, use_cache=use_cache)
        flat = codes.flatten(1)
        steps = [model.step(state, t, None if t == 0 else flat[:, t - 1]) for t in range(model.seq_len)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_step_checks_order():
    model = make()
    state = model.begin(1, None, None)
    with pytest.raises(ValueError):
        model.step(state, 1, torch.zeros(1, dtype=torch.long))


def test_sample_level():
    model = make(grid=(4, 4), num_classes=NUM_CLASSES, cond_grid=(2, 2))
    B = 3
    _, labels, cond = inputs(model, batch=B)
    u = image_uniforms(seed=0, level=1, indices=range(B), length=model.seq_len)
    out = sample_level(model, u, labels=labels, cond_codes=cond, temperature=0.9, top_k=5)
    assert out.shape == (B, 4, 4) and out.dtype == torch.long
    assert out.min() >= 0 and out.max() < K
    again = sample_level(model, u, labels=labels, cond_codes=cond, temperature=0.9, top_k=5)
    assert torch.equal(out, again)
    guided = sample_level(model, u, labels=labels, cond_codes=cond, guidance=3.0, top_p=0.9)
    assert guided.shape == (B, 4, 4) and guided.min() >= 0 and guided.max() < K
    # unconditional top prior, no labels
    top = make(grid=(2, 3))
    u = image_uniforms(seed=0, level=0, indices=range(B), length=top.seq_len)
    out = sample_level(top, u)
    assert out.shape == (B, 2, 3) and out.min() >= 0 and out.max() < K


def test_training_reduces_loss():
    model = make(grid=(4, 4), num_classes=NUM_CLASSES, cond_grid=(2, 2)).train()
    codes, labels, cond = inputs(model, batch=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        logits = model(codes, labels, cond)
        loss = F.cross_entropy(logits.reshape(-1, K), codes.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        GatedPixelCNN((4, 4), K, kernel_size=4)
    with pytest.raises(ValueError):
        GatedPixelCNN((4, 4), K, cond_grid=(2, 2), cond_num_codes=0)
