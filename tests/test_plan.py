"""The GPU plan on paper (pipeline/plan.py, python -m pipeline.plan): its formulas against real models, caches and
FLOP counts of tiny instances, and the printed plan of every preset it is meant for."""

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline import plan
from pipeline.config import load_config
from pipeline.plan_report import dataset_defaults, load_plan_config, main
from pipeline.priors import build_prior
from pipeline.sampling import image_uniforms, sample_level
from pipeline.vqvae import VQVAE2
from tests.conftest import SMOKE

FFHQ_PENDING = ["vqvae.strides=[8,2,2]", "prior.levels.middle1.kind=gpt", "prior.levels.middle1.arch=llama",
                "prior.levels.middle1.n_layer=16", "prior.levels.middle1.n_embd=1024",
                "prior.levels.middle1.n_head=16"]  # the pending keys of configs/ffhq1024.yaml's comment block


def test_plan_presets_load_with_todays_config():
    imagenet = load_config("configs/imagenet256.yaml")
    assert (imagenet.data.image_size, imagenet.data.channels, imagenet.vqvae.levels) == (256, 3, 2)
    assert imagenet.prior.class_conditional
    ffhq = load_config("configs/ffhq1024.yaml")
    assert (ffhq.data.image_size, ffhq.vqvae.levels, ffhq.prior.class_conditional) == (1024, 3, False)
    for cfg in (imagenet, ffhq):
        f = cfg.fabric
        assert (f.accelerator, f.devices, f.strategy, f.precision) == ("cuda", 8, "fsdp", "bf16-mixed")


def test_dataset_sizes_by_name_or_folder():
    assert dataset_defaults(load_config("configs/imagenet256.yaml")) == (1_281_167, 1000)
    assert dataset_defaults(load_config("configs/ffhq1024.yaml")) == (70_000, 0)
    assert dataset_defaults(load_config("configs/emoji.yaml")) == (0, 0)  # a folder: its name field is not its data


def test_grids_and_sequences_of_the_presets():
    imagenet, _ = load_plan_config("configs/imagenet256.yaml", [])
    shapes = plan.prior_shapes(imagenet, 1000)
    assert [(s.side, s.prefix, s.positions) for s in shapes] == [(32, 1, 1024), (64, 1 + 1024, 5120)]
    windowed, pending = load_plan_config("configs/imagenet256.yaml", ["prior.cond_window=8"])
    assert pending == ["prior.cond_window=8"]  # not a key of today's config: set for the plan only
    assert [s.positions for s in plan.prior_shapes(windowed, 1000)] == [1024, 4096]
    ffhq, _ = load_plan_config("configs/ffhq1024.yaml", FFHQ_PENDING)
    assert plan.grid_sides(ffhq) == [32, 64, 128]  # the paper's grids; today's strides give 64, 128, 256
    assert plan.grid_sides(load_config("configs/ffhq1024.yaml")) == [64, 128, 256]
    assert plan.level_net(ffhq, "middle1").n_layer == 16 and plan.level_net(ffhq, "bottom").n_layer == 8
    assert [s.positions for s in plan.prior_shapes(ffhq, 0)] == [1024, 5120, 4096 + 16384]


@pytest.mark.parametrize("config,overrides", [("configs/imagenet256.yaml", []), ("configs/ffhq1024.yaml", FFHQ_PENDING),
                                              ("configs/mnist.yaml", []), (SMOKE, ["prior.top.kind=pixelcnn"]),
                                              (SMOKE, ["vqvae.levels=3", "data.image_size=32", "vqvae.strides=[2,2,4]",
                                                       "prior.levels.middle1.n_layer=2", "prior.cond_window=2"])])
def test_plan_prints_every_table(config, overrides, capsys):
    assert main(["--config", config, *overrides]) == 0
    out = capsys.readouterr().out
    for title in ("## Levels and sequences", "## Training memory per GPU", "## Training throughput",
                  "## Sampling memory and speed"):
        assert title in out
    levels = load_plan_config(config, overrides)[0].vqvae.levels
    assert out.count("| stage 2 ") == 3 * levels  # memory: DDP and FSDP; throughput
    assert "MFU 0.4" in out and "989 TFLOP/s" in out  # the assumptions are printed with the figures
    for line in out.splitlines():  # the formula's count equals the model built on the meta device, where it can
        if (line.startswith("| VQ-VAE") or " prior (" in line) and "n/a" not in line:
            cells = [c.strip() for c in line.split("|")]
            assert cells[-3] == cells[-2], line


@pytest.mark.parametrize("override,named", [("vqvae.strides=[4,3]", "vqvae.strides"),
                                            ("prior.levels.middle.n_layer=2", "prior.levels"),
                                            ("prior.levels.bottom.n_embd=30", "prior.levels.bottom.n_embd"),
                                            ("prior.cond_window=-1", "prior.cond_window"),
                                            ("stage2.batch=3", "stage2.batch")])
def test_bad_plan_override_is_one_error_line(override, named, capsys):
    assert main(["--config", SMOKE, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err


@pytest.mark.parametrize("overrides", [
    [],  # the smoke config's GPTs, class-conditional
    ["prior.top.arch=llama", "prior.bottom.arch=llama", "prior.bottom.n_embd=48"],
    ["prior.top.kind=pixelcnn", "prior.top.channels=16", "prior.top.layers=2",
     "prior.bottom.kind=pixelcnn", "prior.bottom.channels=8", "prior.bottom.layers=3", "prior.bottom.kernel_size=3"],
    ["vqvae.levels=3", "data.image_size=32", "vqvae.quantizer=loss", "prior.class_conditional=false"],
])
def test_parameter_formulas_equal_the_built_models(overrides):
    cfg = load_config(SMOKE, overrides)
    num_classes = 10 if cfg.prior.class_conditional else 0
    for shape in plan.prior_shapes(cfg, num_classes):
        net = plan.level_net(cfg, shape.name)
        cond = (shape.cond_side,) * 2 if shape.cond_side else None
        prior = build_prior(net, (shape.side,) * 2, shape.num_codes, num_classes, cond, shape.cond_num_codes)
        assert plan.plan_prior(net, shape).params == sum(p.numel() for p in prior.parameters()), shape.name
    model = VQVAE2(cfg.vqvae, cfg.data.channels)
    assert plan.plan_stage1(cfg).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("levels,size", [(1, 16), (2, 16), (3, 32)])
def test_vqvae_walk_matches_the_forward_pass(levels, size):
    """FLOPs as torch's counter counts them (convolutions and the code distances) and every conv/ReLU output."""
    cfg = load_config(SMOKE, [f"vqvae.levels={levels}", f"data.image_size={size}"])
    model = VQVAE2(cfg.vqvae, cfg.data.channels).eval()
    outputs = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.ReLU)):
            m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].numel()))  # one image: out[0]
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(2, cfg.data.channels, size, size) * 2 - 1)
    walk = plan.vqvae_layers(cfg)
    assert sum(x.outputs for x in walk) == sum(outputs)
    assert plan.plan_stage1(cfg).flops == 3 * counter.get_total_flops() // 2  # per image, training = 3 x forward


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_formula_equals_a_real_guided_cache(arch, monkeypatch):
    """The cache of a bottom prior sampled with classifier-free guidance: every position fed, twice the rows."""
    cfg = load_config(SMOKE, [f"prior.bottom.arch={arch}"])
    top, bottom = plan.prior_shapes(cfg, 3)
    net = plan.level_net(cfg, "bottom")
    prior = build_prior(net, (bottom.side,) * 2, bottom.num_codes, 3, (top.side,) * 2, top.num_codes).eval()
    states = []
    begin = prior.begin
    monkeypatch.setattr(prior, "begin", lambda *a, **k: states.append(begin(*a, **k)) or states[-1])
    batch = 3
    sample_level(prior, image_uniforms(0, 1, range(batch), bottom.tokens), labels=torch.tensor([0, 1, 2]),
                 cond_codes=torch.randint(0, top.num_codes, (batch, top.side, top.side)), guidance=2.0)
    cache = states[0].past
    real = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    dtype_bytes = next(prior.parameters()).element_size()
    assert real == plan.kv_cache_bytes(net.n_layer, net.n_embd, bottom.positions, dtype_bytes, sequences=2 * batch)
    assert plan.plan_prior(net, bottom).kv == plan.kv_cache_bytes(net.n_layer, net.n_embd, bottom.positions, 2)


def _saved_bytes(fn, params) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs under CPU bf16 autocast (parameters
    excluded, each storage counted once)."""
    seen, skip = {}, {p.untyped_storage().data_ptr() for p in params}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        fn()
    return sum(n for ptr, n in seen.items() if ptr not in skip)


@pytest.mark.parametrize("kind,arch", [("gpt", "gpt2"), ("gpt", "llama"), ("pixelcnn", "")])
def test_activation_coefficient_matches_saved_tensors(kind, arch):
    """Bytes saved per position x width x block, from two depths (what the rest of the model saves cancels); the
    bf16 weight copies autocast saves are subtracted. A modelling estimate: within 10%."""
    batch, width, saved = 8, 96, {}
    for layers in (1, 3):
        net_keys = [f"prior.bottom.arch={arch}", f"prior.bottom.n_layer={layers}", f"prior.bottom.n_embd={width}",
                    "prior.bottom.n_head=4"] if kind == "gpt" else \
            ["prior.bottom.kind=pixelcnn", f"prior.bottom.layers={layers}", f"prior.bottom.channels={width}"]
        cfg = load_config(SMOKE, ["data.image_size=32", *net_keys])
        top, bottom = plan.prior_shapes(cfg, 10)
        net = plan.level_net(cfg, "bottom")
        prior = build_prior(net, (bottom.side,) * 2, bottom.num_codes, 10, (top.side,) * 2, top.num_codes).train()
        inputs = (torch.randint(0, bottom.num_codes, (batch, bottom.side, bottom.side)),
                  torch.randint(0, 10, (batch,)), torch.randint(0, top.num_codes, (batch, top.side, top.side)))
        saved[layers] = _saved_bytes(partial(prior, *inputs), prior.parameters())
        per_block_weights = (plan.gpt_params(net, bottom)[1] - bottom.vocab * width) // layers if kind == "gpt" \
            else sum(p.numel() for p in prior.blocks[0].parameters())
    per_block = (saved[3] - saved[1]) / 2 - plan.BF16 * per_block_weights
    coef = per_block / (batch * (bottom.positions if kind == "gpt" else bottom.tokens) * width)
    expected = plan.ACT_COEF[arch] if kind == "gpt" else plan.PIXELCNN_ACT_COEF
    assert abs(coef - expected) < 0.1 * expected, coef


def test_vqvae_activation_estimate_matches_saved_tensors():
    """Conv and ReLU outputs in bf16 plus the transient code distances: within 25% of what autograd saves."""
    cfg = load_config(SMOKE, ["data.image_size=64", "data.channels=3", "vqvae.levels=3"])
    model = VQVAE2(cfg.vqvae, 3).eval()  # eval: no k-means init; autograd saves the same tensors
    batch = 4
    x = torch.rand(batch, 3, 64, 64) * 2 - 1
    per_image = _saved_bytes(lambda: model(x).loss, model.parameters()) / batch
    assert 0.75 < per_image / plan.plan_stage1(cfg).act < 1.25


@pytest.mark.parametrize("num_classes,conditioned", [(10, True), (0, True), (10, False), (0, False)])
def test_pixelcnn_state_formula_equals_the_real_sampling_state(num_classes, conditioned):
    cfg = load_config(SMOKE, ["data.image_size=32", "prior.bottom.kind=pixelcnn", "prior.bottom.channels=16",
                              "prior.bottom.layers=3", "prior.bottom.cond_channels=8"])
    top, bottom = plan.prior_shapes(cfg, num_classes)
    if not conditioned:
        bottom = plan.PriorShape("bottom", bottom.side, bottom.num_codes, num_classes)
    net = plan.level_net(cfg, "bottom")
    cond = (top.side,) * 2 if conditioned else None
    prior = build_prior(net, (bottom.side,) * 2, bottom.num_codes, num_classes, cond, bottom.cond_num_codes).eval()
    batch = 3
    labels = torch.arange(batch) if num_classes else None
    with torch.no_grad():
        state = prior.begin(batch, labels, torch.randint(0, top.num_codes, (batch, *cond)) if cond else None)
        prev = None
        for t in range(bottom.side + 2):  # past the first row: every per-layer row buffer exists
            prev = prior.step(state, t, prev).argmax(-1)
    parts = [getattr(state, f) for f in ("canvas", "cond_feat", "label_bias", "bias_row")]
    real = sum(x.nbytes for x in parts if x is not None) + sum(x.nbytes for x in state.v_windows + state.v2h_row)
    assert real == batch * plan.pixelcnn_state_bytes(net, bottom, dtype_bytes=4)
