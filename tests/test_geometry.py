"""Code-grid geometry: per-level strides of the VQ-VAE (``vqvae.strides``) and per-level prior networks
(``prior.levels``), checked from the config down to a sampled image."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, GPTPriorConfig, PixelCNNPriorConfig, VQVAEConfig, load_config
from pipeline.priors.gpt import GPTPrior, window_index
from pipeline.vqvae import VQVAE2
from stages import sample, stage1, stage2
from tests.conftest import rounding_tolerance, run


def tiny_vqvae(levels: int, strides: list[int]) -> VQVAE2:
    return VQVAE2(VQVAEConfig(levels=levels, strides=strides, channels=16, res_channels=8, res_blocks=1,
                              codebook_size=16, code_dim=8, kmeans_init=False, restart_after=0))


@pytest.mark.parametrize("levels,strides,size,grids", [
    (2, [], 32, [(4, 4), (8, 8)]),  # the default geometry: bottom 1/4, then halved
    (3, [2, 2, 2], 16, [(2, 2), (4, 4), (8, 8)]),
    (2, [8, 2], 64, [(4, 4), (8, 8)]),  # a high-resolution bottom grid kept small
    (2, [2, 4], 32, [(4, 4), (16, 16)]),
    (1, [8], 32, [(4, 4)]),
])
def test_strides_set_the_grids_and_the_model_follows(levels, strides, size, grids):
    model = tiny_vqvae(levels, strides)
    x = torch.rand(2, 1, size, size) * 2 - 1
    out = model(x)
    assert model.grid_shapes(size) == grids
    assert [tuple(c.shape[1:]) for c in out.codes] == grids
    assert out.reconstruction.shape == x.shape
    assert model.cfg.downsample == size // grids[0][0]
    with torch.no_grad():
        assert model.decode_codes(model.encode(x)).shape == x.shape


def test_default_strides_are_the_explicit_vqvae2_ones():
    """strides=[] and [4, 2, 2] build the same modules (so checkpoints of either load into the other)."""
    a, b = tiny_vqvae(3, []).state_dict(), tiny_vqvae(3, [4, 2, 2]).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize("overrides,message", [
    (["vqvae.strides=[4]"], "vqvae.strides=[4] is not allowed: give one stride per level (vqvae.levels=2), bottom "
                            "first, e.g. [4, 2], or [] for that"),
    (["vqvae.strides=[4, 3]"], "vqvae.strides[1]=3 is not allowed: each stride must be a power of two >= 2"),
    (["vqvae.strides=[1, 2]"], "vqvae.strides[0]=1 is not allowed: each stride must be a power of two >= 2"),
    (["vqvae.strides=[8, 4]"], "data.image_size=16 is not allowed: must be divisible by the total downsampling the "
                               "product of vqvae.strides [8, 4] = 32 (e.g. 32)"),
    (["vqvae.strides=4"], "vqvae.strides=4: expected a list of int"),
    (["prior.levels.middle1.n_layer=2"], "prior.levels='middle1' is not allowed: a level of vqvae.levels=2 is named "
                                         "one of top, bottom"),
    (["prior.levels.bottom.kind=pixelcnn", "prior.levels.bottom.n_layer=2"],
     "prior.levels.bottom.n_layer is a gpt setting but prior.levels.bottom.kind=pixelcnn"),
    (["prior.levels.top.n_embd=30"], "prior.levels.top.n_embd=30 is not allowed: must be a positive multiple of"),
    (["prior.levels=3"], "prior.levels=3: expected a mapping"),
    (["prior.cond_window=2"], "prior.cond_window=2 is not allowed: an odd window size >= 1 (e.g. 3), or 0"),
    (["prior.cond_window=-1"], "prior.cond_window=-1 is not allowed: an odd window size"),
    (["prior.cond_window=3", "vqvae.levels=1"], "prior.cond_window=3 is not allowed: only GPT priors below the top"),
    (["prior.cond_window=3", "prior.bottom.kind=pixelcnn"], "prior.cond_window=3 is not allowed: only GPT priors"),
])
def test_bad_geometry_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/smoke.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_net_for_picks_the_named_level_else_top_or_bottom():
    cfg = load_config("configs/smoke.yaml", ["vqvae.levels=3", "vqvae.strides=[2, 2, 2]",
                                              "prior.levels.middle1.kind=pixelcnn", "prior.levels.middle1.layers=2"])
    p = cfg.prior
    assert p.net_for("top") is p.top and p.net_for("bottom") is p.bottom
    assert isinstance(p.net_for("middle1"), PixelCNNPriorConfig) and p.net_for("middle1").layers == 2
    assert p.net_for("middle1").channels == PixelCNNPriorConfig().channels  # from the kind's defaults
    two = load_config("configs/smoke.yaml", ["prior.levels.top.n_layer=3"]).prior
    assert isinstance(two.net_for("top"), GPTPriorConfig) and two.net_for("top").n_layer == 3
    assert two.net_for("top").n_embd == GPTPriorConfig().n_embd and two.net_for("bottom") is two.bottom


def test_config_with_levels_survives_a_checkpoint_round_trip():
    """The checkpoint's config dict (migrated on load) keeps per-level networks as they were."""
    from pipeline.config import config_from_dict

    cfg = load_config("configs/smoke.yaml", ["prior.levels.bottom.kind=pixelcnn", "prior.levels.bottom.layers=2",
                                              "vqvae.strides=[2, 4]"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.prior.net_for("bottom").layers == 2


def test_three_levels_with_strides_and_a_per_level_prior_run_end_to_end(tmp_path, capsys):
    """stage 1 -> stage 2 -> sample with strides [2, 2, 2] (16 px: grids 2, 4, 8), a PixelCNN middle prior and a
    windowed GPT bottom prior; the sample stage lowers its batch to fit sample.max_kv_gib."""
    overrides = ["vqvae.levels=3", "vqvae.strides=[2, 2, 2]", "stage1.max_steps=3", "stage2.max_steps=3",
                 "prior.cond_window=3",
                 "prior.levels.middle1.kind=pixelcnn", "prior.levels.middle1.channels=8",
                 "prior.levels.middle1.layers=2", "prior.levels.middle1.cond_channels=8",
                 "sample.num=4", "sample.grid_images=0", "data.max_images=200"]
    for module in (stage1, stage2):
        assert run(module, tmp_path, *overrides) == 0
    per_image = 2 * 1 * 64 * 32 * 4  # the bottom GPT's cache: keys and values x 1 layer x 64 positions x 32 wide
    budget = f"sample.max_kv_gib={2.5 * per_image / 2**30}"
    assert run(sample, tmp_path, *overrides, budget) == 0
    assert "sample: 2 images per batch instead of sample.batch_size=16" in capsys.readouterr().out
    assert run(sample, tmp_path, *overrides, budget, "sample.dtype=bfloat16") == 0
    assert "sample: 5 images per batch" in capsys.readouterr().out  # a bfloat16 cache is half the size
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    assert manifest["levels"] == ["top", "middle1", "bottom"]
    assert manifest["grids"] == [[2, 2], [4, 4], [8, 8]]
    config = json.loads((tmp_path / "sampler" / "config.json").read_text())
    assert [p["net"]["kind"] for p in config["priors"]] == ["gpt", "pixelcnn", "gpt"]
    assert [p["cond_window"] for p in config["priors"]] == [0, 0, 3]  # the window is a GPT's below the top
    assert config["vqvae"]["strides"] == [2, 2, 2]
    with np.load(tmp_path / "samples" / "samples.npz") as z:
        assert z["images"].shape == (4, 16, 16, 1)
        assert [z[f"codes_{n}"].shape[1:] for n in ("top", "middle1", "bottom")] == [(2, 2), (4, 4), (8, 8)]


# ---------------------------------------------------------------------------------------- windowed conditioning
K, KC, C = 10, 6, 2
GRID, COND = (6, 6), (3, 3)


def windowed(arch: str = "gpt2", k: int = 3) -> GPTPrior:
    torch.manual_seed(0)
    return GPTPrior(GRID, K, C, COND, KC, arch=arch, n_layer=2, n_embd=16, n_head=2, cond_window=k).eval()


def test_window_index_is_the_window_around_the_parent():
    parent = window_index(GRID, COND, 1)[:, 0].view(GRID)  # k = 1: the upper code above each lower code
    assert torch.equal(parent, torch.tensor([[(i // 2) * 3 + j // 2 for j in range(6)] for i in range(6)]))
    index = window_index(GRID, COND, 3)  # (36, 9)
    assert index.shape == (36, 9)
    assert index[0].tolist() == [9, 9, 9, 9, 0, 1, 9, 3, 4]  # the corner: padding (9) above and left
    assert index[14].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # row 2, column 2: parent 4, the whole 3 x 3 grid


def test_windowed_prior_has_no_prefix():
    prior = windowed()
    assert prior.prefix_len == 1 and prior.n_positions == 36  # [class] + 36 codes - the last; no 9-code prefix
    assert prior.vocab_size == K + C + 1  # no upper codes among the tokens
    codes = torch.randint(0, K, (2, *GRID))
    assert prior(codes, torch.tensor([0, C]), torch.randint(0, KC, (2, *COND))).shape == (2, 36, K)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@torch.no_grad()
def test_window_limits_the_upper_codes_each_position_sees(arch):
    """Position t sees the windows of codes 0..t only: changing an upper code first inside the window of code f
    leaves the logits of codes < f unchanged and changes those of code f. With the whole-grid prefix every
    position would change."""
    prior = windowed(arch)
    g = torch.Generator().manual_seed(1)
    codes, cond = torch.randint(0, K, (3, *GRID), generator=g), torch.randint(0, KC, (3, *COND), generator=g)
    labels = torch.tensor([0, 1, C])
    base = prior(codes, labels, cond)
    tol = rounding_tolerance(base)
    index = window_index(GRID, COND, 3)
    for cell in range(9):
        first = int((index == cell).any(1).nonzero()[0])  # the first code whose window holds the cell
        changed = cond.clone().view(3, -1)
        changed[:, cell] = (changed[:, cell] + 1) % KC
        out = prior(codes, labels, changed.view(cond.shape))
        torch.testing.assert_close(out[:, :first], base[:, :first], rtol=0, atol=tol)
        assert (out[:, first] - base[:, first]).abs().max() > 100 * tol
    assert first > 0  # the last cell (bottom right) is outside the first codes' windows


def test_a_stage1_run_from_before_strides_resumes(tmp_path, capsys):
    """A checkpoint whose config has no vqvae.strides (written before the key) resumes: missing means the default."""
    assert run(stage1, tmp_path, "stage1.max_steps=2", "data.max_images=200") == 0
    last = tmp_path / "stage1" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["meta"]["config"]["vqvae"]["strides"]
    torch.save(ckpt, last)
    capsys.readouterr()
    assert run(stage1, tmp_path, "stage1.max_steps=3", "data.max_images=200") == 0
    assert "resuming from" in capsys.readouterr().out
