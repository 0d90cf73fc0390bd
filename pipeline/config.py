"""The run configuration: typed dataclasses, loaded from one YAML file plus ``key=value`` overrides.

Every key is declared here with its type and default; an unknown key, a value of the wrong type or an
impossible value raises :class:`ConfigError` with one line naming the key, the value and what is allowed,
before any work starts. The resolved config is written beside every run and stored in every checkpoint,
so later stages rebuild models from it instead of re-declaring shapes.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.io import UserError, atomic_write_text


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message is one line meant for the user."""


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded | folder | hub | idx
    name: str = "mnist_5k"  # embedded: mnist_5k; hub: the dataset name on the Hugging Face Hub (or a local copy)
    path: str = ""  # folder: a directory of images (class sub-folders give labels); idx: a folder of IDX files
    split: str = "train"  # hub: the split to train on
    holdout_split: str = "auto"  # auto: the data's own val/validation/test split if it has one | none: carve out
    image_key: str = "image"  # hub: the image column
    label_key: str = "label"  # hub: the label column ("" for none)
    class_names: list[str] = field(default_factory=list)  # idx: the names of labels 0, 1, ... (else from the data)
    image_size: int = 32  # images are padded/resized to image_size x image_size
    channels: int = 1  # 1 (grey) or 3 (RGB)
    holdout_fraction: float = 0.1  # held-out share carved out with a fixed seed (and its share of max_images)
    split_seed: int = 0  # seed of the held-out carve-out and of the max_images subset (>= 0)
    max_images: int = 0  # 0 = all; otherwise at most N images in all, drawn with split_seed
    on_corrupt: str = "skip"  # skip (count and warn) | error
    background: str = "white"  # what transparent pixels show: a colour name, #rrggbb or rgb(r, g, b)
    hflip: bool = False  # stage-1 training only: flip each image left-right with probability 1/2
    crop_scale: float = 1.0  # stage-1 training only: random resized crop keeping >= this share of the area (1 = off)
    num_proc: int = 0  # processes that decode a large image set (0 = one per core)
    num_workers: int = 0  # DataLoader worker processes (with streaming: the processes that decode and augment)
    streaming: str = "auto"  # folder or hub: always (decode in the loader, a part per rank) | never | auto (> 2 GiB)
    stream_holdout: int = 5000  # a streamed Hub dataset: held-out images, the first N of its own held-out split


@dataclass
class FabricConfig:
    accelerator: str = "cpu"  # cpu | cuda | mps | auto
    devices: int = 1  # processes per node
    num_nodes: int = 1  # machines
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp
    precision: str = "bf16-mixed"  # 32-true | bf16-mixed | 16-mixed | bf16-true
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    fsdp_checkpoint: str = "full"  # fsdp: full (one file, gathered on rank 0) | sharded (each rank writes its shard)
    activation_checkpointing: bool = False  # fsdp: recompute each prior block's activations in backward (less memory)


def level_names(levels: int) -> list[str]:
    """Names of the code levels, top first: ["top", "bottom"] for two; ["top", "middle1", ..., "bottom"] else."""
    if levels == 1:
        return ["top"]
    return ["top"] + [f"middle{i}" for i in range(1, levels - 1)] + ["bottom"]


@dataclass
class VQVAEConfig:
    levels: int = 2  # code levels (the grid of each: see strides)
    strides: list[int] = field(default_factory=list)  # per level, bottom first, vs the level below: [] = [4, 2, 2, ..]
    channels: int = 64  # hidden width of encoders and decoders
    res_channels: int = 32  # bottleneck width inside residual blocks
    res_blocks: int = 2  # residual blocks per stack
    codebook_size: int = 512  # codes per level (>= 2)
    code_dim: int = 64  # size of a code vector
    beta: float = 0.25  # commitment weight
    quantizer: str = "ema"  # ema (EMA codebook updates) | loss (codebook loss)
    decay: float = 0.99  # EMA decay
    eps: float = 1e-5  # Laplace smoothing of EMA counts
    kmeans_init: bool = True  # initialise codebooks from the first batch's encoder outputs (k-means)
    kmeans_iters: int = 10  # k-means iterations of that initialisation
    restart_after: int = 50  # restart a code unused for this many steps (0 = never)
    recon_loss: str = "bounded"  # bounded (no penalty past -1 or 1 where the target is there: black stays black) | mse

    def level_strides(self) -> list[int]:
        """Each level's downsampling relative to the level below, bottom first (the bottom's relative to the
        image): ``strides`` if given, else VQ-VAE-2's 4 for the bottom and 2 for every level above it."""
        return list(self.strides) or [4] + [2] * (self.levels - 1)

    def level_downsampling(self) -> list[int]:
        """Each level's total downsampling relative to the image, top first (the order of the code grids)."""
        return [math.prod(self.level_strides()[: i + 1]) for i in reversed(range(self.levels))]

    @property
    def downsample(self) -> int:
        """Total downsampling of the coarsest (top) level."""
        return math.prod(self.level_strides())


@dataclass
class TrainConfig:
    """Settings of the shared training loop (``pipeline.training``); used by stage 1 and stage 2."""

    max_steps: int = 2000  # optimizer steps
    batch_size: int = 64  # per process; the global batch is batch_size x devices x num_nodes x grad_accum
    lr: float = 3e-4  # AdamW learning rate (betas 0.9, 0.95)
    weight_decay: float = 0.0  # AdamW decay (not on biases and norms)
    warmup_steps: int = 100  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr x min_lr_ratio
    grad_clip: float = 1.0  # 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    eval_every: int = 500  # steps between held-out evaluations (and one at the end)
    log_every: int = 25  # steps between log lines
    seed: int = 0  # model init and data order (>= 0)
    skip_nonfinite: bool = False  # skip a batch with a NaN/Inf loss instead of stopping
    channels_last: bool = True  # channels_last memory format
    compile: bool = False  # torch.compile the model


ADVERSARIAL_LOSSES = ("hinge", "wgan-gp")  # stage1.adversarial_loss (pipeline.critic)


@dataclass
class Stage1Config(TrainConfig):
    max_steps: int = 2000
    lr: float = 1e-3
    warmup_steps: int = 50
    grid_images: int = 16  # originals/reconstructions in the PNG grid (0 = no grid)
    adversarial_weight: float = 0.0  # weight of the VQGAN-style adversarial term x its adaptive weight (0 = off)
    adversarial_start: int = 1000  # step from which the adversarial term trains the autoencoder (the critic: from 0)
    adversarial_loss: str = "hinge"  # hinge | wgan-gp (gradient penalty weight 10)
    critic_channels: int = 64  # width of the patch critic's first layer


@dataclass
class GPTPriorConfig:
    """A GPT prior: GPT-2 or Llama from ``transformers``, built from a config (``pipeline.priors.gpt``)."""

    kind: str = "gpt"  # gpt | pixelcnn: the network; setting it by override starts from that kind's defaults
    arch: str = "gpt2"  # gpt2 | llama
    n_layer: int = 4  # transformer blocks
    n_embd: int = 128  # width (a multiple of n_head)
    n_head: int = 4  # attention heads
    dropout: float = 0.0  # dropout rate

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.arch", self.arch, ("gpt2", "llama"))
        _check(self.n_layer >= 1, f"{key}.n_layer", self.n_layer, "must be >= 1")
        _check(self.n_head >= 1 and self.n_embd % self.n_head == 0, f"{key}.n_embd", self.n_embd,
               f"must be a positive multiple of n_head={self.n_head}")
        _check(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class PixelCNNPriorConfig:
    """A gated PixelCNN prior with a top-code conditioning network (``pipeline.priors.pixelcnn``)."""

    kind: str = "pixelcnn"  # gpt | pixelcnn: the network; setting it by override starts from that kind's defaults
    channels: int = 64  # width
    layers: int = 8  # gated layers
    kernel_size: int = 5  # odd kernel size
    cond_channels: int = 64  # width of the top-code conditioning network
    cond_res_blocks: int = 2  # residual blocks of that network
    dropout: float = 0.0  # dropout rate

    def validate(self, key: str) -> None:
        _check(self.channels >= 1, f"{key}.channels", self.channels, "must be >= 1")
        _check(self.layers >= 1, f"{key}.layers", self.layers, "must be >= 1")
        _check(self.kernel_size >= 3 and self.kernel_size % 2 == 1, f"{key}.kernel_size", self.kernel_size,
               "odd and >= 3")
        _check(self.cond_channels >= 1, f"{key}.cond_channels", self.cond_channels, "must be >= 1")
        _check(self.cond_res_blocks >= 0, f"{key}.cond_res_blocks", self.cond_res_blocks, "must be >= 0")
        _check(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "must be in [0, 1)")


PRIOR_NETS = {"gpt": GPTPriorConfig, "pixelcnn": PixelCNNPriorConfig}  # the prior kinds, by their ``kind``
PriorNetConfig = GPTPriorConfig | PixelCNNPriorConfig


def prior_net_from_dict(values: dict[str, Any], key: str = "prior") -> PriorNetConfig:
    """The config class of ``values["kind"]`` (default gpt) built from ``values``; a key of another kind is named."""
    kind = values.get("kind", "gpt")
    _check_choice(f"{key}.kind", kind, tuple(PRIOR_NETS))
    cls = PRIOR_NETS[kind]
    own = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        other = [k for k, c in PRIOR_NETS.items() if k != kind and name in {f.name for f in dataclasses.fields(c)}]
        if name not in own and other:
            raise ConfigError(f"{key}.{name} is a {other[0]} setting but {key}.kind={kind}; remove it, or set "
                              f"{key}.kind={other[0]}")
    return _build(cls, values, key + ".")


@dataclass
class PriorConfig:
    top: GPTPriorConfig | PixelCNNPriorConfig = field(default_factory=GPTPriorConfig)  # the top level's network
    bottom: GPTPriorConfig | PixelCNNPriorConfig = field(default_factory=GPTPriorConfig)  # every level below
    levels: dict[str, PriorNetConfig] = field(default_factory=dict)  # by level name (e.g. middle1): its own network
    cond_window: int = 0  # GPTs below the top see the k x k upper codes around each code (odd k), 0 = the whole grid
    class_conditional: bool = True  # needs labelled data
    class_dropout: float = 0.1  # label replaced by the null label with this rate (classifier-free guidance)

    def net_for(self, level: str) -> GPTPriorConfig | PixelCNNPriorConfig:
        """The network of the level named ``level`` (``pipeline.config.level_names``): its entry in ``levels``,
        else ``top`` for the top level and ``bottom`` for every level below it."""
        return self.levels.get(level) or (self.top if level == "top" else self.bottom)

    def window_for(self, level: str) -> int:
        """The conditioning window of that level's prior: ``cond_window`` for a GPT below the top, else 0 (the top
        has no upper level; a PixelCNN sees the upper codes through its convolutional conditioning network)."""
        return self.cond_window if level != "top" and self.net_for(level).kind == "gpt" else 0


@dataclass
class Stage2Config(TrainConfig):
    max_steps: int = 3000
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 500


@dataclass
class ExtractConfig:
    """The code extraction that opens stage 2 (the stage-1 model encodes every image once)."""

    batch_size: int = 256  # images per batch of the code extraction
    shard_size: int = 100_000  # code grids per shard file
    copies: int = 0  # also encode this many copies of every training image, each shifted by whole pixels (0 = off)
    shift: int = 1  # the copies' largest shift in pixels, each axis (a random offset other than (0, 0) per copy)


SAMPLE_DTYPES = ("float32", "bfloat16")  # sample.dtype: names of torch dtypes
KV_CACHES = ("dynamic", "static")  # sample.kv_cache: transformers' DynamicCache or StaticCache


@dataclass
class SampleConfig:
    num: int = 1000  # images to sample
    batch_size: int = 250  # images per batch (the images do not depend on it, up to float rounding)
    max_kv_gib: float = 0.0  # per process: lower batch_size so the largest level's key/value cache fits (0 = off)
    dtype: str = "float32"  # float32 | bfloat16: the priors' weights and key/value cache while sampling
    kv_cache: str = "dynamic"  # dynamic | static: GPT levels' key/value cache grown per step or preallocated
    compile: bool = False  # torch.compile the GPT levels' one-code step (needs kv_cache: static)
    temperature: float = 1.0  # softmax temperature, > 0
    top_k: int = 0  # keep the k most likely codes (0 = off)
    top_p: float = 1.0  # nucleus mass in (0, 1] (1 = off)
    labels: str = "uniform"  # uniform | a class name or index | comma-separated names or indices (cycled) | none
    guidance: float = 1.0  # classifier-free guidance scale (1 = off)
    seed: int = 0  # image i depends only on (seed, i, settings); >= 0
    grid_images: int = 64  # images in grid.png (0 = no grid)
    accept: float = 1.0  # rejection sampling: draw num / accept, keep the num most typical of their class (1 = off)
    threshold: float = 0.0  # rejection sampling: keep samples whose asked class has this classifier probability


@dataclass
class EvaluateConfig:
    extractor: str = "inception"  # the headline's features: inception (the standard FID network) | domain
    domain_column: bool = True  # with extractor=inception: the domain classifier's metrics beside it, per class too
    inception_path: str = ""  # local TorchScript file of the FID InceptionV3 (extractor: inception)
    inception_runtime: str = "auto"  # what runs it: auto (onnxruntime on the CPU when installed) | torch | onnxruntime
    k: int = 3  # neighbourhood size for precision/recall/density/coverage
    num_real: int = 0  # N real images per side (reference, floor); 0 = all held-out; more tops the floor up from train
    classifier_steps: int = 800  # training steps of the domain classifier
    classifier_batch_size: int = 128  # its batch size
    batch_size: int = 250  # feature extraction batch
    bootstrap: int = 100  # resamplings for the 95% intervals of FID, precision and recall (0 = none)
    gather_features: int = 0  # features gathered on rank 0 per set for precision/recall, KID, intervals (0 = all N)
    reference_dir: str = ""  # real sets' statistics, shared by runs; empty: $PIPELINE_REFERENCE_DIR or ~/.cache/...


@dataclass
class SweepConfig:
    """The truncation sweep (``make sweep``): one sample set per setting, each scored against the same reference."""

    temperatures: list[float] = field(default_factory=lambda: [0.7, 0.85, 1.0, 1.15])  # each > 0, at top_p 1
    top_p: list[float] = field(default_factory=lambda: [0.8, 0.95])  # each in (0, 1), at temperature 1
    num: int = 500  # images per setting
    guidance: list[float] = field(default_factory=lambda: [1.0, 3.0])  # each >= 0, at temperature 1 and top_p 1
    accept: list[float] = field(default_factory=lambda: [0.5, 0.25])  # rejection sampling's acceptance rates
    extractor: str = "domain"  # domain | inception: the features the sweep scores in (domain: fast, has labels)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    fabric: FabricConfig = field(default_factory=FabricConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    prior: PriorConfig = field(default_factory=PriorConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------
# building from dicts, with type checks


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; int -> float is the only silent conversion."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == set(PRIOR_NETS.values()):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping (a config section)")
        return prior_net_from_dict(value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {tp}")
    if origin is dict:
        _, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping of names to sections")
        return {str(k): _coerce(f"{key}.{k}", v, item_tp) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list of {_type_name(item_tp)}, e.g. [1, 2]")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping (a config section)")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value}: expected a finite number, not inf or nan")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. labels: 7
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint}; allowed in {prefix or 'the top level'}: "
                              f"{', '.join(names)}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML (numbers, true/false, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. stage1.max_steps=200")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge(base: dict[str, Any], path: list[str], value: Any, full_key: str) -> None:
    node = base
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            if part not in node:
                node[part] = {}
            else:
                raise ConfigError(f"override {full_key}: {part} is not a section")
        node = node[part]
    if path[-1] == "kind" and value in PRIOR_NETS and node.get("kind", "gpt") != value:
        # another kind of network: the preset's settings of the old kind do not apply to it
        own = {f.name for f in dataclasses.fields(PRIOR_NETS[value])}
        for name in [k for k in node if k not in own]:
            del node[name]
    node[path[-1]] = value


RENAMED = {  # old key -> new key: refused in presets and overrides (naming the new key), moved in old checkpoints
    ("stage2", "extract_batch_size"): ("extract", "batch_size"),
    ("stage2", "shard_size"): ("extract", "shard_size"),
    ("evaluate", "sweep_temperatures"): ("sweep", "temperatures"),
    ("evaluate", "sweep_top_p"): ("sweep", "top_p"),
    ("evaluate", "sweep_num"): ("sweep", "num"),
}


def _renamed(values: dict[str, Any], migrate: bool) -> dict[str, Any]:
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in (values or {}).items()}
    for (sec, key), (new_sec, new_key) in RENAMED.items():
        if isinstance(values.get(sec), dict) and key in values[sec]:
            if not migrate:
                raise ConfigError(f"{sec}.{key} is now {new_sec}.{new_key}; write {new_sec}.{new_key}="
                                  f"{values[sec][key]}")
            values.setdefault(new_sec, {}).setdefault(new_key, values[sec].pop(key))
    prior = values.get("prior")
    if migrate and isinstance(prior, dict):  # every field of both kinds, as written before per-kind configs
        prior = values["prior"] = dict(prior)
        for level, net in prior.items():
            if level != "levels" and isinstance(net, dict) and net.get("kind", "gpt") in PRIOR_NETS:
                own = {f.name for f in dataclasses.fields(PRIOR_NETS[net.get("kind", "gpt")])}
                prior[level] = {k: v for k, v in net.items() if k in own}
    return values


def config_from_dict(values: dict[str, Any], migrate: bool = True) -> Config:
    """The config of a dict, e.g. a checkpoint's; keys renamed since it was written are moved (``migrate``)."""
    cfg = _build(Config, _renamed(values, migrate))
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML preset (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; presets live in configs/ (e.g. configs/mnist.yaml)")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        _merge(values, keys, value, text)
    return config_from_dict(values, migrate=False)


def config_diff(a: dict[str, Any], b: dict[str, Any], sections: tuple[str, ...]) -> list[str]:
    """``section.key: old -> new`` for every key whose value differs between two config dicts, in ``sections``."""
    out = []
    for sec in sections:
        for key in sorted(set(a.get(sec, {})) | set(b.get(sec, {}))):
            if a.get(sec, {}).get(key) != b.get(sec, {}).get(key):
                out.append(f"{sec}.{key}: {a.get(sec, {}).get(key)!r} -> {b.get(sec, {}).get(key)!r}")
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# validation of values (types were checked while building)


def _is_colour(text: str) -> bool:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(text)
    except ValueError:
        return False
    return True


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "choose one of " + ", ".join(choices))


def _check_train(name: str, t: TrainConfig) -> None:
    _check(t.max_steps >= 1, f"{name}.max_steps", t.max_steps, "must be >= 1")
    _check(t.batch_size >= 1, f"{name}.batch_size", t.batch_size, "must be >= 1")
    _check(t.lr > 0, f"{name}.lr", t.lr, "the learning rate must be > 0")
    _check(t.weight_decay >= 0, f"{name}.weight_decay", t.weight_decay, "must be >= 0")
    _check(t.warmup_steps >= 0, f"{name}.warmup_steps", t.warmup_steps, "must be >= 0")
    _check(0 <= t.min_lr_ratio <= 1, f"{name}.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _check(t.grad_clip >= 0, f"{name}.grad_clip", t.grad_clip, "must be >= 0 (0 = off)")
    _check(t.grad_accum >= 1, f"{name}.grad_accum", t.grad_accum, "must be >= 1")
    for key in ("checkpoint_every", "eval_every", "log_every"):
        _check(getattr(t, key) >= 1, f"{name}.{key}", getattr(t, key), "must be >= 1 (steps)")
    _check(t.seed >= 0, f"{name}.seed", t.seed, "must be >= 0")


def _check_stage1(s: Stage1Config) -> None:
    _check_train("stage1", s)
    _check(s.grid_images >= 0, "stage1.grid_images", s.grid_images, "must be >= 0 (0 = no grid)")
    _check(s.adversarial_weight >= 0, "stage1.adversarial_weight", s.adversarial_weight,
           "must be >= 0 (0 = no adversarial term; e.g. 0.8 to switch it on)")
    _check(s.adversarial_start >= 0, "stage1.adversarial_start", s.adversarial_start,
           "must be >= 0 (the step from which the adversarial term trains the autoencoder)")
    _check_choice("stage1.adversarial_loss", s.adversarial_loss, ADVERSARIAL_LOSSES)
    _check(s.critic_channels >= 8, "stage1.critic_channels", s.critic_channels, "must be >= 8 (e.g. 64)")


def check_sampling_settings(temperature: float, top_k: int, top_p: float, guidance: float, prefix: str = "") -> None:
    """The rules of the sampling settings, written once (the config's ``sample`` section, the sampler, the command
    line): a ValueError ``{prefix}key=value is not allowed: rule`` for the first one broken."""
    rules = (
        ("temperature", temperature, math.isfinite(temperature) and temperature > 0,
         "must be > 0 and finite (top_k=1 gives greedy decoding)"),
        ("top_k", top_k, top_k >= 0, "must be >= 0 (0 = off)"),
        ("top_p", top_p, math.isfinite(top_p) and 0 < top_p <= 1, "must be in (0, 1] (1 = off)"),
        ("guidance", guidance, math.isfinite(guidance) and guidance >= 0, "must be >= 0 and finite (1 = off)"),
    )
    for key, value, ok, rule in rules:
        if not ok:
            raise ValueError(f"{prefix}{key}={value!r} is not allowed: {rule}")


def check_decoding(kv_cache: str, compile: bool, prefix: str = "") -> None:
    """The rules of how a GPT prior runs its sampling steps, written once (the config's ``sample`` section, the
    sampler): a ValueError ``{prefix}key=value is not allowed: rule``. ``compile`` needs the static cache: with the
    dynamic one every step's shapes differ, and torch.compile would recompile at each step."""
    if kv_cache not in KV_CACHES:
        raise ValueError(f"{prefix}kv_cache={kv_cache!r} is not allowed: choose one of {', '.join(KV_CACHES)}")
    if compile and kv_cache != "static":
        raise ValueError(f"{prefix}compile={compile!r} is not allowed: it needs {prefix}kv_cache=static (the "
                         "preallocated cache keeps every step's shapes fixed, so the step compiles once)")


def _validate_data(d: DataConfig, v: VQVAEConfig) -> None:
    _check_choice("data.source", d.source, ("embedded", "folder", "hub", "idx"))
    if d.source == "embedded":
        _check_choice("data.name", d.name, ("mnist_5k",))
    if d.source == "folder":
        _check(bool(d.path), "data.path", d.path, "set data.path to a folder of images for data.source=folder")
    if d.source == "idx":
        _check(bool(d.path), "data.path", d.path, "set data.path to the folder of IDX files for data.source=idx")
    _check(bool(d.holdout_split.strip()), "data.holdout_split", d.holdout_split,
           "auto (the data's own held-out split if any), none (carve out), or a split name")
    _check(not d.class_names or d.source in ("idx", "hub"), "data.class_names", d.class_names,
           "only for data.source=idx or hub (folders name classes by their sub-folders, the digits are 0-9)")
    _check(len(set(d.class_names)) == len(d.class_names), "data.class_names", d.class_names, "names must differ")
    _check(0 < d.crop_scale <= 1, "data.crop_scale", d.crop_scale, "must be in (0, 1] (1 = no random crop)")
    _check(d.num_proc >= 0, "data.num_proc", d.num_proc, "must be >= 0 (0 = one per core)")
    _check(d.channels in (1, 3), "data.channels", d.channels, "1 (grey) or 3 (RGB)")
    _check(d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8")
    downsample = v.downsample
    total = f"the product of vqvae.strides {v.strides}" if v.strides else "2^(vqvae.levels+1)"
    _check(d.image_size % downsample == 0, "data.image_size", d.image_size,
           f"must be divisible by the total downsampling {total} = {downsample} "
           f"(e.g. {max(downsample, d.image_size // downsample * downsample)})")
    _check(0 < d.holdout_fraction < 1, "data.holdout_fraction", d.holdout_fraction, "must be in (0, 1)")
    _check(d.split_seed >= 0, "data.split_seed", d.split_seed, "must be >= 0")
    _check(d.max_images >= 0, "data.max_images", d.max_images, "must be >= 0 (0 = all)")
    _check_choice("data.on_corrupt", d.on_corrupt, ("skip", "error"))
    _check(_is_colour(d.background), "data.background", d.background,
           "a colour name (white), #rrggbb or rgb(r, g, b)")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _check_choice("data.streaming", d.streaming, ("auto", "always", "never"))
    _check(d.streaming != "always" or d.source in ("folder", "hub"), "data.streaming", d.streaming,
           f"streams only from an image folder or a Hub dataset (data.source=folder or hub, not {d.source}); use "
           "auto or never")
    _check(d.stream_holdout >= 1, "data.stream_holdout", d.stream_holdout, "must be >= 1")
    _check(not (d.max_images and d.streaming == "always" and d.source == "hub"), "data.max_images", d.max_images,
           "a streamed Hub dataset reads its whole training split; set data.max_images=0 or data.streaming=never")


def _validate_strides(v: VQVAEConfig) -> None:
    example = [4] + [2] * (v.levels - 1)
    _check(not v.strides or len(v.strides) == v.levels, "vqvae.strides", v.strides,
           f"give one stride per level (vqvae.levels={v.levels}), bottom first, e.g. {example}, or [] for that")
    for i, s in enumerate(v.strides):
        _check(s >= 2 and s & (s - 1) == 0, f"vqvae.strides[{i}]", s, "each stride must be a power of two >= 2")


def _validate_prior(p: PriorConfig, levels: int) -> None:
    names = level_names(levels)
    for name in p.levels:
        _check(name in names, "prior.levels", name,
               f"a level of vqvae.levels={levels} is named one of {', '.join(names)}")
    for name, net in [("top", p.top), ("bottom", p.bottom)] + [(f"levels.{n}", net) for n, net in p.levels.items()]:
        net.validate(f"prior.{name}")
    _check(p.cond_window == 0 or (p.cond_window > 0 and p.cond_window % 2 == 1), "prior.cond_window", p.cond_window,
           "an odd window size >= 1 (e.g. 3), or 0 for the whole upper grid")
    _check(p.cond_window == 0 or any(p.window_for(n) for n in names), "prior.cond_window", p.cond_window,
           "only GPT priors below the top use it: set vqvae.levels >= 2 with a gpt prior below the top, or 0")
    _check(0 <= p.class_dropout < 1, "prior.class_dropout", p.class_dropout, "must be in [0, 1)")


def validate(cfg: Config) -> None:
    _check(1 <= cfg.vqvae.levels <= 4, "vqvae.levels", cfg.vqvae.levels, "must be 1 to 4")
    _validate_strides(cfg.vqvae)
    _validate_data(cfg.data, cfg.vqvae)
    f, v = cfg.fabric, cfg.vqvae
    _check_choice("fabric.accelerator", f.accelerator, ("cpu", "cuda", "mps", "gpu", "auto"))
    _check(f.devices >= 1, "fabric.devices", f.devices, "must be >= 1")
    _check(f.num_nodes >= 1, "fabric.num_nodes", f.num_nodes, "must be >= 1")
    _check_choice("fabric.strategy", f.strategy, ("auto", "ddp", "ddp_spawn", "fsdp"))
    _check_choice("fabric.precision", f.precision, ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"))
    _check(f.threads >= 0, "fabric.threads", f.threads, "must be >= 0 (0 = torch's default)")
    _check(not (f.strategy == "fsdp" and f.accelerator == "mps"), "fabric.strategy", f.strategy,
           "FSDP does not run on MPS (fabric.accelerator=mps); use fabric.strategy=auto")
    _check_choice("fabric.fsdp_checkpoint", f.fsdp_checkpoint, ("full", "sharded"))
    _check(f.strategy == "fsdp" or not f.activation_checkpointing, "fabric.activation_checkpointing",
           f.activation_checkpointing, "needs fabric.strategy=fsdp")

    _check(v.channels >= 8, "vqvae.channels", v.channels, "must be >= 8")
    _check(v.res_channels >= 1, "vqvae.res_channels", v.res_channels, "must be >= 1")
    _check(v.res_blocks >= 0, "vqvae.res_blocks", v.res_blocks, "must be >= 0")
    _check(v.codebook_size >= 2, "vqvae.codebook_size", v.codebook_size, "must be >= 2 (a codebook needs 2+ codes)")
    _check(v.code_dim >= 1, "vqvae.code_dim", v.code_dim, "must be >= 1")
    _check(v.beta >= 0, "vqvae.beta", v.beta, "must be >= 0")
    _check_choice("vqvae.quantizer", v.quantizer, ("ema", "loss"))
    _check_choice("vqvae.recon_loss", v.recon_loss, ("mse", "bounded"))
    _check(0 < v.decay < 1, "vqvae.decay", v.decay, "must be in (0, 1)")
    _check(v.eps > 0, "vqvae.eps", v.eps, "must be > 0")
    _check(v.kmeans_iters >= 0, "vqvae.kmeans_iters", v.kmeans_iters, "must be >= 0")
    _check(v.restart_after >= 0, "vqvae.restart_after", v.restart_after, "must be >= 0 (0 = never)")

    _check_stage1(cfg.stage1)
    _check_train("stage2", cfg.stage2)
    _check(cfg.extract.batch_size >= 1, "extract.batch_size", cfg.extract.batch_size, "must be >= 1")
    _check(cfg.extract.shard_size >= 1, "extract.shard_size", cfg.extract.shard_size, "must be >= 1")
    _check(cfg.extract.copies >= 0, "extract.copies", cfg.extract.copies, "must be >= 0 (0 = no shifted copies)")
    _check(1 <= cfg.extract.shift < cfg.data.image_size, "extract.shift", cfg.extract.shift,
           f"must be >= 1 pixel and below data.image_size ({cfg.data.image_size})")

    _validate_prior(cfg.prior, v.levels)

    s = cfg.sample
    _check(s.num >= 1, "sample.num", s.num, "must be >= 1")
    _check(s.batch_size >= 1, "sample.batch_size", s.batch_size, "must be >= 1")
    _check_choice("sample.dtype", s.dtype, SAMPLE_DTYPES)
    _check(s.max_kv_gib >= 0, "sample.max_kv_gib", s.max_kv_gib, "GiB of key/value cache per process, >= 0 (0 = off)")
    try:
        check_sampling_settings(s.temperature, s.top_k, s.top_p, s.guidance, prefix="sample.")
        check_decoding(s.kv_cache, s.compile, prefix="sample.")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check(s.seed >= 0, "sample.seed", s.seed, "must be >= 0 (image i depends only on the seed, i and the settings)")
    _check(s.grid_images >= 0, "sample.grid_images", s.grid_images, "must be >= 0 (0 = no grid)")
    _check(0 < s.accept <= 1, "sample.accept", s.accept, "an acceptance rate in (0, 1] (1 = no rejection)")
    _check(0 <= s.threshold < 1, "sample.threshold", s.threshold, "a probability in [0, 1) (0 = no rejection)")
    _check(s.accept == 1 or s.threshold == 0, "sample.threshold", s.threshold,
           f"use sample.accept={s.accept} or sample.threshold, not both")

    e = cfg.evaluate
    _check_choice("evaluate.extractor", e.extractor, ("domain", "inception"))
    _check_choice("evaluate.inception_runtime", e.inception_runtime, ("auto", "torch", "onnxruntime"))
    _check(e.k >= 1, "evaluate.k", e.k, "must be >= 1")
    _check(e.bootstrap >= 0, "evaluate.bootstrap", e.bootstrap, "must be >= 0 (0 = no intervals)")
    _check(e.num_real >= 0, "evaluate.num_real", e.num_real, "must be >= 0 (0 = all held-out)")
    _check(e.classifier_steps >= 1, "evaluate.classifier_steps", e.classifier_steps, "must be >= 1")
    _check(e.gather_features == 0 or e.gather_features > e.k, "evaluate.gather_features", e.gather_features,
           f"must be 0 (all) or more than evaluate.k={e.k} (precision/recall need k + 1 points)")
    w = cfg.sweep
    _check(all(t > 0 for t in w.temperatures), "sweep.temperatures", w.temperatures, "temperatures must be > 0")
    _check(all(0 < p <= 1 for p in w.top_p), "sweep.top_p", w.top_p, "values in (0, 1]")
    _check(w.num >= 1, "sweep.num", w.num, "must be >= 1")
    _check(all(0 < a < 1 for a in w.accept), "sweep.accept", w.accept, "acceptance rates in (0, 1) ([] = none)")
    _check(all(0 <= g < math.inf for g in w.guidance), "sweep.guidance", w.guidance, "scales >= 0 and finite")
    _check_choice("sweep.extractor", w.extractor, ("domain", "inception"))
