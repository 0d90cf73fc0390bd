"""The GPU plan on paper (pipeline/plan.py, python -m pipeline.plan): its formulas against real models, caches and
FLOP counts of tiny instances, and the printed plan of every preset it is meant for."""

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline import plan
from pipeline.config import level_names, load_config
from pipeline.plan_report import dataset_defaults, main
from pipeline.priors import build_prior
from pipeline.sampling import cache_batch_limit, image_uniforms, sample_level
from pipeline.vqvae import VQVAE2
from tests.conftest import SMOKE

# a strided 3-level geometry (grids 2, 8, 16 at 32 px), its own middle network and windowed lower GPTs
STRIDED = ["vqvae.levels=3", "data.image_size=32", "vqvae.strides=[2,2,4]", "prior.levels.middle1.arch=llama",
           "prior.levels.middle1.n_layer=2", "prior.levels.middle1.n_embd=48", "prior.cond_window=3"]


def _meta_vqvae(cfg) -> VQVAE2:
    with torch.device("meta"):
        return VQVAE2(cfg.vqvae, cfg.data.channels)


def test_plan_presets_load():
    imagenet = load_config("configs/imagenet256.yaml")
    assert (imagenet.data.image_size, imagenet.data.channels, imagenet.vqvae.levels) == (256, 3, 2)
    assert imagenet.prior.class_conditional
    ffhq = load_config("configs/ffhq1024.yaml")
    assert (ffhq.data.image_size, ffhq.vqvae.levels, ffhq.prior.class_conditional) == (1024, 3, False)
    for cfg in (imagenet, ffhq):
        f = cfg.fabric
        assert (f.accelerator, f.devices, f.strategy, f.precision) == ("cuda", 8, "fsdp", "bf16-mixed")


def test_ffhq_preset_has_the_papers_grids_and_a_middle_prior_of_its_own():
    cfg = load_config("configs/ffhq1024.yaml")
    assert _meta_vqvae(cfg).grid_shapes(1024) == [(32, 32), (64, 64), (128, 128)]
    assert plan.grid_sides(cfg) == [32, 64, 128]
    middle, bottom = cfg.prior.net_for("middle1"), cfg.prior.net_for("bottom")
    assert (middle.arch, middle.n_layer, middle.n_embd) == ("llama", 16, 1024)
    assert (bottom.n_layer, bottom.n_embd) == (8, 512) and middle is not bottom


def test_dataset_sizes_by_name_or_folder():
    assert dataset_defaults(load_config("configs/imagenet256.yaml")) == (1_281_167, 1000)
    assert dataset_defaults(load_config("configs/ffhq1024.yaml")) == (70_000, 0)
    assert dataset_defaults(load_config("configs/emoji.yaml")) == (0, 0)  # a folder: its name field is not its data


def test_grids_and_sequences_of_the_presets():
    imagenet = load_config("configs/imagenet256.yaml")
    shapes = plan.prior_shapes(imagenet, 1000)
    assert [(s.side, s.prefix, s.positions) for s in shapes] == [(32, 1, 1024), (64, 1 + 1024, 5120)]
    windowed = load_config("configs/imagenet256.yaml", ["prior.cond_window=9"])
    assert [(s.window, s.positions) for s in plan.prior_shapes(windowed, 1000)] == [(0, 1024), (9, 4096)]
    ffhq = load_config("configs/ffhq1024.yaml")
    assert [s.positions for s in plan.prior_shapes(ffhq, 0)] == [1024, 5120, 4096 + 16384]
    pixel_bottom = load_config("configs/ffhq1024.yaml", ["prior.cond_window=7", "prior.bottom.kind=pixelcnn"])
    assert [s.window for s in plan.prior_shapes(pixel_bottom, 0)] == [0, 7, 0]  # PriorConfig.window_for: GPTs only


@pytest.mark.parametrize("overrides", [[], STRIDED, ["vqvae.levels=2", "data.image_size=64", "vqvae.strides=[8,2]"],
                                       ["vqvae.levels=1", "vqvae.strides=[16]"]])
def test_plan_grids_are_the_built_models(overrides):
    cfg = load_config(SMOKE, overrides)
    model = VQVAE2(cfg.vqvae, cfg.data.channels).eval()
    size = cfg.data.image_size
    codes = model.encode(torch.rand(1, cfg.data.channels, size, size) * 2 - 1)
    assert [(s, s) for s in plan.grid_sides(cfg)] == model.grid_shapes(size) == [tuple(c.shape[1:]) for c in codes]


@pytest.mark.parametrize("config,overrides", [("configs/imagenet256.yaml", []), ("configs/ffhq1024.yaml", []),
                                              ("configs/imagenet256.yaml", ["prior.cond_window=9",
                                                                            "sample.max_kv_gib=40"]),
                                              ("configs/mnist.yaml", []), (SMOKE, ["prior.top.kind=pixelcnn"]),
                                              (SMOKE, STRIDED)])
def test_plan_prints_every_table(config, overrides, capsys):
    assert main(["--config", config, *overrides]) == 0
    out = capsys.readouterr().out
    for title in ("## Levels and sequences", "## Training memory per GPU", "## Training throughput",
                  "## Sampling memory and speed"):
        assert title in out
    levels = load_config(config, overrides).vqvae.levels
    assert out.count("| stage 2 ") == 3 * levels  # memory: DDP and FSDP; throughput
    assert "MFU 0.4" in out and "989 TFLOP/s" in out  # the assumptions are printed with the figures
    rows = [line for line in out.splitlines() if line.startswith("| VQ-VAE") or " prior (" in line]
    assert len(rows) == 1 + levels and "n/a" not in out
    for line in rows:  # the formula's count equals the model built on the meta device, strided and windowed too
        cells = [c.strip() for c in line.split("|")]
        assert cells[-3] == cells[-2], line


@pytest.mark.parametrize("override,named", [("vqvae.strides=[4,3]", "vqvae.strides"),
                                            ("prior.levels.middle.n_layer=2", "prior.levels"),
                                            ("prior.levels.bottom.n_embd=30", "prior.levels.bottom.n_embd"),
                                            ("prior.cond_window=-1", "prior.cond_window"),
                                            ("prior.cond_window=8", "prior.cond_window=8"),
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
    STRIDED,
    [*STRIDED, "prior.cond_window=5", "prior.class_conditional=false", "prior.bottom.kind=pixelcnn"],
])
def test_parameter_formulas_equal_the_built_models(overrides):
    """Built on CPU as stage 2 builds them (``PriorConfig.net_for``, ``window_for``), not through the plan."""
    cfg = load_config(SMOKE, overrides)
    num_classes = 10 if cfg.prior.class_conditional else 0
    grids = VQVAE2(cfg.vqvae, cfg.data.channels).grid_shapes(cfg.data.image_size)
    shapes = plan.prior_shapes(cfg, num_classes)
    assert [s.name for s in shapes] == level_names(cfg.vqvae.levels)
    k = cfg.vqvae.codebook_size
    for level, (shape, name) in enumerate(zip(shapes, level_names(cfg.vqvae.levels))):
        net = cfg.prior.net_for(name)
        prior = build_prior(net, grids[level], k, num_classes, grids[level - 1] if level else None, k if level else 0,
                            cfg.prior.window_for(name))
        assert plan.plan_prior(net, shape, 4).params == sum(p.numel() for p in prior.parameters()), name
        assert plan.built_prior_params(net, shape) == sum(p.numel() for p in prior.parameters()), name
    model = VQVAE2(cfg.vqvae, cfg.data.channels)
    assert plan.plan_stage1(cfg).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("levels,size,strides", [(1, 16, "[]"), (2, 16, "[]"), (3, 32, "[]"), (3, 32, "[2,2,4]"),
                                                (2, 64, "[8,2]"), (1, 16, "[16]")])
def test_vqvae_walk_matches_the_forward_pass(levels, size, strides):
    """FLOPs as torch's counter counts them (convolutions and the code distances), every conv/ReLU output and the
    parameters, for VQ-VAE-2's strides and for others (3 or 4 halvings in one encoder, several per upsampler)."""
    cfg = load_config(SMOKE, [f"vqvae.levels={levels}", f"data.image_size={size}", f"vqvae.strides={strides}"])
    model = VQVAE2(cfg.vqvae, cfg.data.channels).eval()
    outputs = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.ReLU)):
            m.register_forward_hook(lambda _m, _i, out: outputs.append(out[0].numel()))  # one image: out[0]
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(2, cfg.data.channels, size, size) * 2 - 1)
    walk = plan.vqvae_layers(cfg)
    assert sum(x.outputs for x in walk) == sum(outputs)
    assert plan.plan_stage1(cfg).params == sum(p.numel() for p in model.parameters()) == plan.built_vqvae_params(cfg)
    assert plan.plan_stage1(cfg).flops == 3 * counter.get_total_flops() // 2  # per image, training = 3 x forward


@pytest.mark.parametrize("arch,window", [("gpt2", 0), ("llama", 0), ("gpt2", 3)])
def test_kv_cache_formula_equals_a_real_guided_cache(arch, window, monkeypatch):
    """The cache of a bottom prior sampled with classifier-free guidance: every position fed, twice the rows; a
    windowed prior has no upper codes among its positions."""
    cfg = load_config(SMOKE, [f"prior.bottom.arch={arch}", f"prior.cond_window={window}"])
    top, bottom = plan.prior_shapes(cfg, 3)
    net = cfg.prior.net_for("bottom")
    prior = build_prior(net, (bottom.side,) * 2, bottom.num_codes, 3, (top.side,) * 2, top.num_codes,
                        bottom.window).eval()
    assert bottom.positions == (bottom.tokens if window else top.tokens + bottom.tokens)
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
    assert plan.plan_prior(net, bottom, 2).kv == plan.kv_cache_bytes(net.n_layer, net.n_embd, bottom.positions, 2)


@pytest.mark.parametrize("overrides", [["sample.max_kv_gib=0.001"], ["sample.max_kv_gib=1e-6"], ["sample.max_kv_gib=0"],
                                       ["sample.max_kv_gib=0.001", "sample.dtype=bfloat16"],
                                       ["sample.max_kv_gib=0.001", "sample.labels=none"]])
def test_sampling_batch_is_the_samplers(overrides):
    """The plan's batch is what ``Sampler.kv_batch_size`` would pick: ``cache_batch_limit`` over the built priors
    (meta device) in ``sample.dtype``, guided (class-conditional smoke, guidance 2) unless labels=none."""
    cfg = load_config(SMOKE, ["data.image_size=32", "sample.guidance=2", "sample.batch_size=64", *overrides])
    shapes = plan.prior_shapes(cfg, 10)
    plans = [plan.plan_prior(cfg.prior.net_for(s.name), s, plan.sample_dtype_bytes(cfg)) for s in shapes]
    guided = plan.is_guided(cfg, 10)
    assert guided == (cfg.sample.labels != "none")
    with torch.device("meta"):
        priors = [build_prior(cfg.prior.net_for(s.name), (s.side,) * 2, s.num_codes, 10,
                              (s.cond_side,) * 2 if s.cond_side else None, s.cond_num_codes, s.window) for s in shapes]
    real = cache_batch_limit(priors, cfg.sample.max_kv_gib * 2**30, guided, getattr(torch, cfg.sample.dtype))
    assert plan.kv_batch_limit(cfg, plans, guided) == (real if cfg.sample.max_kv_gib else None)
    assert plan.sampling_batch(cfg, plans, guided) == (max(1, min(64, real)) if cfg.sample.max_kv_gib else 64)


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
        net = cfg.prior.net_for("bottom")
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
    net = cfg.prior.net_for("bottom")
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
