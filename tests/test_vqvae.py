import pytest
import torch
import torch.nn.functional as F

from pipeline.config import VQVAEConfig
from pipeline.vqvae import VQVAE2, bounded_mse


def tiny(levels=2, **kw):
    return VQVAEConfig(levels=levels, channels=16, res_channels=8, res_blocks=1, codebook_size=16, code_dim=8,
                       kmeans_init=False, restart_after=0, **kw)


@pytest.mark.parametrize("levels,size,channels", [(1, 16, 1), (2, 16, 1), (2, 32, 3), (3, 32, 1), (2, 24, 1)])
def test_shapes(levels, size, channels):
    model = VQVAE2(tiny(levels), in_channels=channels)
    x = torch.rand(2, channels, size, size) * 2 - 1
    out = model(x)
    assert out.reconstruction.shape == x.shape
    grids = model.grid_shapes(size)
    assert [tuple(c.shape[1:]) for c in out.codes] == grids
    assert grids[-1] == (size // 4, size // 4) and grids[0] == (size // 2 ** (levels + 1),) * 2
    assert len(out.usage) == len(out.perplexity) == levels
    out.loss.backward()
    assert all(p.grad is not None for p in model.encoders[0].parameters())


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_decode_codes_of_encode_equals_reconstruction(levels):
    model = VQVAE2(tiny(levels)).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(x)
        codes = model.encode(x)
        assert all(torch.equal(a, b) for a, b in zip(codes, out.codes))
        assert torch.allclose(model.decode_codes(codes), out.reconstruction, atol=1e-6)


def test_lower_level_depends_on_upper_level_codes():
    model = VQVAE2(tiny(2)).eval()
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        top, bottom = model.encode(x)
        a = model.decode_codes([top, bottom])
        b = model.decode_codes([(top + 1) % 16, bottom])
    assert not torch.allclose(a, b)


def test_save_load_same_outputs(tmp_path):
    model = VQVAE2(tiny(2)).train()
    model(torch.rand(4, 1, 16, 16))  # one training step changes EMA buffers
    model.eval()
    torch.save({"model": model.state_dict()}, tmp_path / "m.ckpt")
    clone = VQVAE2(tiny(2)).eval()
    clone.load_state_dict(torch.load(tmp_path / "m.ckpt", weights_only=True)["model"])
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x).reconstruction, clone(x).reconstruction)


def test_bounded_mse_is_mse_inside_the_range_and_free_past_an_edge_target():
    target = torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0, -1.0, 0.5])
    inside = torch.tensor([-0.9, -1.0, 0.3, 0.8, 1.0, -0.2, -0.7])
    assert torch.allclose(bounded_mse(inside, target), F.mse_loss(inside, target), rtol=0, atol=1e-7)
    past = torch.tensor([-1.7, -1.01, 0.0, 1.3, 1.0, -1.0, 0.5])  # edge targets overshot: no cost at all
    assert bounded_mse(past, target) == 0
    # overshooting the wrong edge, or an interior target, is charged in full
    assert torch.allclose(bounded_mse(torch.tensor([1.5, -1.5]), torch.tensor([-1.0, 0.0])),
                          torch.tensor((2.5**2 + 1.5**2) / 2))


def test_bounded_mse_keeps_the_gradient_of_interior_pixels_below_the_range():
    """Clamping the output would zero it (a decoder pushed below -1 everywhere would never recover)."""
    recon = torch.tensor([-1.5, -1.5, -0.5], requires_grad=True)
    bounded_mse(recon, torch.tensor([-1.0, 0.2, -1.0])).backward()
    assert recon.grad[0] == 0 and recon.grad[1] < 0 and recon.grad[2] > 0


def test_bounded_images_stay_in_range_and_decode_as_reconstructed():
    model = VQVAE2(tiny(2, recon_loss="bounded")).eval()
    with torch.no_grad():
        model.decoder[-1].bias.fill_(-3.0)  # the raw output far below black
        x = torch.rand(3, 1, 16, 16) * 2 - 1
        out = model(x)
        assert out.reconstruction.min() >= -1 and out.reconstruction.max() <= 1
        assert (out.reconstruction == -1).float().mean() > 0.9
        assert torch.allclose(model.decode_codes(out.codes), out.reconstruction, atol=1e-6)
    plain = VQVAE2(tiny(2, recon_loss="mse")).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert plain(x).reconstruction.min() < -1.5  # the same weights trained with plain MSE show their raw output
