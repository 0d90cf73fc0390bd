import pytest

from pipeline.config import Config, ConfigError, load_config, parse_override


@pytest.mark.parametrize(
    "override,message",
    [
        ("stage1.max_stepz=5", "unknown config key stage1.max_stepz"),
        ("bogus.key=1", "unknown config key bogus"),
        ("stage1.max_steps=abc", "stage1.max_steps='abc': expected an integer"),
        ("stage1.lr=-0.1", "stage1.lr=-0.1 is not allowed: the learning rate must be > 0"),
        ("data.image_size=30", "data.image_size=30 is not allowed: must be divisible by the total downsampling"),
        ("vqvae.codebook_size=1", "vqvae.codebook_size=1 is not allowed: must be >= 2"),
        ("vqvae.quantizer=kmeans", "vqvae.quantizer='kmeans' is not allowed: choose one of ema, loss"),
        ("vqvae.recon_loss=l1", "vqvae.recon_loss='l1' is not allowed: choose one of mse, bounded"),
        ("vqvae.kmeans_init=maybe", "vqvae.kmeans_init='maybe': expected true or false"),
        ("sample.top_p=1.5", "sample.top_p=1.5 is not allowed: must be in (0, 1]"),
        ("extract.copies=-1", "extract.copies=-1 is not allowed: must be >= 0"),
        ("extract.shift=16", "extract.shift=16 is not allowed: must be >= 1 pixel and below data.image_size (16)"),
        ("sample.temperature=0", "sample.temperature=0.0 is not allowed: must be > 0"),
        ("fabric.devices=0", "fabric.devices=0 is not allowed"),
        ("fabric.strategy=fsdp fabric.accelerator=mps", "fabric.strategy='fsdp' is not allowed: FSDP does not run on"),
        ("prior.top.kind=rnn", "prior.top.kind='rnn' is not allowed: choose one of gpt, pixelcnn"),
        ("data.source=web", "data.source='web' is not allowed"),
        ("data.background=nocolour", "data.background='nocolour' is not allowed: a colour name (white), #rrggbb"),
        ("sweep.temperatures=0.5", "expected a list"),
        ("evaluate.inception_runtime=tensorrt",
         "evaluate.inception_runtime='tensorrt' is not allowed: choose one of auto, torch, onnxruntime"),
        ("evaluate.sweep_num=200", "evaluate.sweep_num is now sweep.num; write sweep.num=200"),
        ("stage2.shard_size=10", "stage2.shard_size is now extract.shard_size"),
        ("stage1.max_steps", "expected key=value"),
    ],
)
def test_bad_values_are_rejected_with_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/smoke.yaml", override.split(" "))
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_image_size_message_depends_on_levels():
    with pytest.raises(ConfigError, match=r"2\^\(vqvae.levels\+1\) = 16"):
        load_config(None, ["vqvae.levels=3", "data.image_size=40"])


def test_overrides_are_typed_and_applied():
    cfg = load_config("configs/mnist.yaml", ["stage1.max_steps=7", "stage1.lr=1e-3", "sample.labels=7",
                                             "sweep.temperatures=[0.5, 1]", "vqvae.kmeans_init=false"])
    assert cfg.stage1.max_steps == 7 and cfg.stage1.lr == 1e-3
    assert cfg.sample.labels == "7"
    assert cfg.sweep.temperatures == [0.5, 1.0]
    assert cfg.vqvae.kmeans_init is False


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_roundtrip_through_dict():
    from pipeline.config import config_from_dict

    cfg = load_config("configs/mnist.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("preset", ["configs/mnist.yaml", "configs/smoke.yaml", "configs/cifar10.yaml"])
def test_presets_load(preset):
    assert isinstance(load_config(preset), Config)


def test_parse_override_yaml_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=true") == (["a"], True)


def test_prior_config_per_kind_records_only_its_own_fields():
    from dataclasses import asdict

    from pipeline.config import GPTPriorConfig, PixelCNNPriorConfig

    cfg = load_config("configs/mnist.yaml")
    assert isinstance(cfg.prior.top, GPTPriorConfig) and set(asdict(cfg.prior.top)) == {
        "kind", "arch", "n_layer", "n_embd", "n_head", "dropout"}
    # another kind by override starts from that kind's defaults; the preset's GPT keys do not follow it
    cfg = load_config("configs/mnist.yaml", ["prior.top.kind=pixelcnn", "prior.top.channels=16"])
    assert isinstance(cfg.prior.top, PixelCNNPriorConfig) and cfg.prior.top.channels == 16
    assert cfg.prior.top.layers == PixelCNNPriorConfig().layers and isinstance(cfg.prior.bottom, GPTPriorConfig)
    assert "n_layer" not in asdict(cfg.prior.top)
    # a key of the other kind is refused, naming the kind it belongs to
    with pytest.raises(ConfigError) as err:
        load_config("configs/mnist.yaml", ["prior.top.kernel_size=3"])
    assert str(err.value) == ("prior.top.kernel_size is a pixelcnn setting but prior.top.kind=gpt; remove it, or "
                              "set prior.top.kind=pixelcnn")
    with pytest.raises(ConfigError, match=r"prior.bottom.kernel_size=4 is not allowed: odd and >= 3"):
        load_config("configs/mnist.yaml", ["prior.bottom.kind=pixelcnn", "prior.bottom.kernel_size=4"])


def test_old_prior_specs_with_every_field_load_like_new_ones():
    from pipeline.priors import normalize_spec, prior_from_spec, prior_spec

    cfg = load_config("configs/smoke.yaml")
    spec = prior_spec(cfg.prior.top, (2, 2), 32, 10, None, 0)
    old = {**spec, "net": {**spec["net"], "channels": 16, "layers": 2, "kernel_size": 3, "cond_channels": 16,
                           "cond_res_blocks": 1}}  # how specs were written before the per-kind configs
    assert normalize_spec(old) == spec
    assert sum(p.numel() for p in prior_from_spec(old).parameters()) == sum(
        p.numel() for p in prior_from_spec(spec).parameters())


@pytest.mark.parametrize("override,message", [
    ("fabric.activation_checkpointing=true", r"fabric.activation_checkpointing=True is not allowed: needs "
                                             r"fabric.strategy=fsdp"),
    ("fabric.fsdp_checkpoint=shards", r"fabric.fsdp_checkpoint='shards' is not allowed: choose one of full, sharded"),
])
def test_fsdp_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    load_config(None, ["fabric.strategy=fsdp", "fabric.activation_checkpointing=true",
                       "fabric.fsdp_checkpoint=sharded"])
