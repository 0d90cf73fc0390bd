import pytest
import torch

from pipeline.quantizer import VectorQuantizer, kmeans
from tests.conftest import assert_same_draws, rounding_tolerance


def make_vq(**kw):
    args = dict(codebook_size=16, dim=4, kmeans_init=False, restart_after=0)
    args.update(kw)
    return VectorQuantizer(**args)


@pytest.mark.parametrize("kind", ["ema", "loss"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 3), (1, 4, 8, 5)])
def test_indices_are_brute_force_nearest(kind, shape):
    vq = make_vq(kind=kind).eval()
    z = torch.randn(shape)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)  # (B*H*W, D)
    dist = torch.stack([((vq.codebook - v) ** 2).sum(1) for v in flat])  # (B*H*W, K), another float computation
    chosen = dist.gather(1, out.indices.flatten()[:, None]).squeeze(1)
    # the chosen code is a nearest one up to rounding (an exact tie may go either way), and nearly always the same
    assert (chosen - dist.min(1).values <= rounding_tolerance(dist)).all()
    assert_same_draws(out.indices.flatten()[:, None], dist.argmin(1)[:, None])
    # eval mode: quantized == codebook[indices]
    expected = vq.codebook[out.indices].permute(0, 3, 1, 2)
    assert torch.equal(out.quantized, expected)


def test_straight_through_gradient_reaches_encoder_unchanged():
    vq = make_vq(kind="ema").train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    upstream = torch.randn_like(out.quantized)
    (out.quantized * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)


def test_commitment_and_codebook_loss_gradients():
    vq = make_vq(kind="loss", beta=0.25).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    out.loss.backward()
    zq = vq.codebook.detach()[out.indices].permute(0, 3, 1, 2)
    expected = 0.25 * 2 * (z.detach() - zq) / z.numel()  # d/dz beta*mean((z - sg[e])^2)
    assert torch.allclose(z.grad, expected, atol=1e-6)
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0


def test_ema_update_matches_formula_on_hand_made_example():
    vq = VectorQuantizer(2, 1, kind="ema", decay=0.5, eps=0.0, kmeans_init=False, restart_after=0).train()
    vq.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    vq.ema_sum.copy_(vq.codebook)
    vq.ema_count.fill_(1.0)
    z = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3)  # codes 0, 0, 1
    vq(z)
    # counts: 0.5*1 + 0.5*[2, 1] = [1.5, 1.0]; sums: 0.5*[0, 10] + 0.5*[3, 9] = [1.5, 9.5]
    assert torch.allclose(vq.ema_count, torch.tensor([1.5, 1.0]))
    assert torch.allclose(vq.ema_sum.flatten(), torch.tensor([1.5, 9.5]))
    assert torch.allclose(vq.codebook.flatten(), torch.tensor([1.0, 9.5]))  # eps=0: sum / count


def test_laplace_smoothing_keeps_unused_codes_finite():
    vq = VectorQuantizer(3, 2, kind="ema", decay=0.0, eps=1e-5, kmeans_init=False, restart_after=0).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]]))
    vq(torch.zeros(1, 2, 2, 2))  # all vectors to code 0; codes 1 and 2 get zero counts
    assert torch.isfinite(vq.codebook).all()


def test_dead_code_is_restarted_onto_encoder_outputs():
    vq = make_vq(codebook_size=4, dim=2, restart_after=3).train()
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [200.0, 200.0], [300.0, 300.0]]))
    vq.ema_sum.copy_(vq.codebook)
    z = torch.randn(4, 2, 4, 4) * 0.1  # always nearest to code 0
    for _ in range(3):
        vq(z)
    # codes 1..3 unused for 3 steps: moved near the data
    assert (vq.codebook[1:].abs() < 5).all()
    out = vq.eval()(torch.randn(8, 2, 4, 4) * 0.1)
    assert out.usage > 0.25


def test_kmeans_init_uses_first_batch():
    vq = VectorQuantizer(8, 2, kmeans_init=True, kmeans_iters=5, restart_after=0).train()
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    z = (centres.repeat(64, 1) + 0.1 * torch.randn(256, 2)).T.reshape(1, 2, 16, 16)
    vq(z)
    assert bool(vq.initted)
    # every data cluster has a code nearby
    for c in centres:
        assert ((vq.codebook - c).norm(dim=1).min()) < 1.0


def test_kmeans_recovers_separated_clusters():
    x = torch.cat([torch.randn(50, 2) * 0.05 + torch.tensor(p) for p in ([0.0, 0.0], [3.0, 0.0], [0.0, 3.0])])
    c = kmeans(x, 3, 10, generator=torch.Generator().manual_seed(1))
    assert sorted(c.round().tolist()) == [[0.0, 0.0], [0.0, 3.0], [3.0, 0.0]]


def test_quantization_runs_in_fp32_under_autocast():
    vq = make_vq().train()
    z = torch.randn(2, 4, 3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.quantized.dtype == torch.bfloat16  # handed back in the encoder's dtype
    assert vq.codebook.dtype == torch.float32 and vq.ema_sum.dtype == torch.float32
    vq.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = vq(z)
    plain = vq(z.float())  # indices equal the fp32 computation (no bf16 rounding of distances)
    assert torch.equal(under.indices, plain.indices)
    assert torch.equal(under.quantized, plain.quantized.bfloat16())


def test_bf16_model_keeps_fp32_codebook_statistics_and_trains_like_fp32():
    """``model.to(torch.bfloat16)`` (Fabric's bf16-true) under a bf16 default dtype: the EMA buffers stay float32
    and the updates equal an fp32 quantizer's on the same (bf16) inputs, bit for bit."""
    torch.manual_seed(0)
    ref = make_vq(restart_after=2).train()
    low = make_vq(restart_after=2).train()
    low.load_state_dict(ref.state_dict())
    low = low.to(torch.bfloat16)
    assert all(b.dtype in (torch.float32, torch.bool, torch.int64) for b in low.buffers())
    previous = torch.get_default_dtype()
    for _ in range(4):  # EMA steps and, after 2 idle steps, restarts
        z = torch.randn(2, 4, 3, 3).bfloat16()
        torch.manual_seed(1)
        a = ref(z.float())
        torch.manual_seed(1)
        torch.set_default_dtype(torch.bfloat16)  # what Fabric's bf16-true forward context does
        try:
            b = low(z)
        finally:
            torch.set_default_dtype(previous)
        assert b.quantized.dtype == torch.bfloat16 and torch.equal(a.indices, b.indices)
    for name, buf in ref.state_dict().items():
        assert torch.equal(buf, low.state_dict()[name]), name


def test_perplexity_and_usage():
    vq = make_vq(codebook_size=4, dim=1).eval()
    vq.codebook.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    out = vq(torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 1, 4))
    assert out.usage == 1.0 and torch.isclose(out.perplexity, torch.tensor(4.0))
    out = vq(torch.zeros(1, 1, 1, 4))
    assert out.usage == 0.25 and torch.isclose(out.perplexity, torch.tensor(1.0))


def test_rejects_tiny_codebook():
    with pytest.raises(ValueError, match="codebook_size=1"):
        VectorQuantizer(1, 4)
