import pytest
import torch

from pipeline.config import VQVAEConfig
from pipeline.vqvae import VQVAE2


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
