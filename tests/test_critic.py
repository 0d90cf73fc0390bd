"""The adversarial term of stage 1 (pipeline/critic.py): the critic's shape and spectral norms, the losses on known
inputs, which parameters each term's gradient reaches, the adaptive weight against a hand computation, the EMA
codebooks untouched; then stage 1 with the critic on, its hand-over to stage 2, sampling and the exported sampler,
exact resume, and the resumes it refuses."""

import copy
import csv
import os
import signal

import pytest
import torch
from safetensors import safe_open
from torch.func import functional_call

from pipeline.config import ConfigError, VQVAEConfig, load_config
from pipeline.critic import (
    AdversarialVQVAE,
    PatchCritic,
    adaptive_weight,
    generator_loss,
    generator_term,
    gradient_penalty,
    hinge_critic_loss,
    last_decoder_weight,
    wasserstein_critic_loss,
)
from pipeline.io import load_checkpoint
from pipeline.vqvae import VQVAE2
from stages import sample, stage1, stage2
from tests.conftest import rounding_tolerance, run

ON = ["stage1.adversarial_weight=0.1", "stage1.adversarial_start=5"]


def tiny_vqvae(channels: int = 1) -> VQVAE2:
    return VQVAE2(VQVAEConfig(channels=16, res_channels=8, res_blocks=1, codebook_size=16, code_dim=8, kmeans_iters=2,
                              restart_after=0), in_channels=channels)


def tiny_model(loss: str = "hinge", channels: int = 1) -> AdversarialVQVAE:
    return AdversarialVQVAE(tiny_vqvae(channels), PatchCritic(channels, 8), loss, weight=0.1).train()


def images(n: int = 4, channels: int = 1, size: int = 16) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def close(a: torch.Tensor, b: torch.Tensor, ulps: int = 32) -> bool:
    return bool((a - b).abs().max() <= rounding_tolerance(a, ulps) + 1e-12)


# ---------------------------------------------------------------------------------------------------------
# the critic and the losses


@pytest.mark.parametrize("channels,size", [(1, 16), (1, 32), (3, 64)])
def test_critic_scores_a_grid_of_patches(channels, size):
    critic = PatchCritic(channels, 8)
    logits = critic(images(2, channels, size))
    assert logits.shape == (2, 1, size // 4, size // 4)
    x = images(1, channels, size).requires_grad_(True)  # a corner logit sees a patch of the image, not all of it
    critic(x)[0, 0, 0, 0].backward()
    seen = x.grad[0].abs().sum(0) > 0
    assert seen[:4, :4].all() and not seen[-4:, :].any() and not seen[:, -4:].any()


@pytest.mark.parametrize("scale", [1.0, 25.0])
def test_spectral_norm_keeps_each_layer_at_largest_singular_value_1(scale):
    """Each layer's weight, as the (out, in x k x k) matrix that torch's spectral norm normalises, has its largest
    singular value at 1 whatever the scale of the raw parameter (power iteration, one step per training call)."""
    critic = PatchCritic(1, 16)
    convs = [m for m in critic.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.parametrizations.weight.original.mul_(scale)
    for _ in range(5):
        critic(images())
    for conv in convs:
        raw = torch.linalg.matrix_norm(conv.parametrizations.weight.original.detach().flatten(1), ord=2)
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, abs=0.02), float(sigma)
        if scale > 1:
            assert float(raw) > 5  # the raw parameter is far from 1: the normalisation did the work


def test_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # 0.5 * (mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, .5]))) = 0.5 * (0.25 + 0.75)
    assert float(hinge_critic_loss(real, fake)) == pytest.approx(0.5)
    assert float(hinge_critic_loss(torch.tensor([3.0]), torch.tensor([-3.0]))) == 0.0  # beyond the margins
    assert float(wasserstein_critic_loss(real, fake)) == pytest.approx(-0.75 - 1.25)
    assert float(generator_loss(fake)) == pytest.approx(0.75)


class Linear(torch.nn.Module):
    """D(x) = <w, x> per image, as a (B, 1, 1, 1) grid: its gradient is w everywhere."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)[:, None, None, None]


@pytest.mark.parametrize("norm", [0.5, 1.0, 3.0])
def test_gradient_penalty_of_a_linear_critic_is_its_distance_from_lipschitz_1(norm):
    w = torch.randn(1, 16, 16)
    critic = Linear(w / w.norm() * norm)
    penalty = gradient_penalty(critic, images(), images().flip(0))
    assert float(penalty.detach()) == pytest.approx((norm - 1) ** 2, abs=1e-5)
    if norm != 1:
        penalty.backward()  # it trains the critic (double backward)
        assert critic.w.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# which parameters each term trains


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def test_generator_term_trains_the_autoencoder_and_not_the_critic():
    model = tiny_model()
    recon = model.vqvae(images()).reconstruction
    generator_term(model.critic, recon).backward()
    assert all(float(g.abs().max()) == 0 for g in grads(model.critic).values())
    decoder = grads(model.vqvae.decoder)
    assert all(float(g.abs().max()) > 0 for n, g in decoder.items() if n.endswith("weight"))
    assert float(grads(model.vqvae.encoders).popitem()[1].abs().max()) > 0  # through the straight-through step


def test_generator_term_equals_the_loss_through_a_critic_with_detached_parameters():
    critic = PatchCritic(1, 8)
    x_a, x_b = (images().requires_grad_(True) for _ in range(2))
    term = generator_term(critic, x_a * 1.0)
    term.backward()
    state = {n: p.detach() for n, p in critic.named_parameters()}
    by_hand = -functional_call(critic, state, (x_b,)).mean()  # a second call: one more power-iteration step
    by_hand.backward()
    assert float(term.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-3)
    cos = torch.nn.functional.cosine_similarity(x_a.grad.flatten(), x_b.grad.flatten(), dim=0)
    assert float(cos) > 0.999


def one_step(model: AdversarialVQVAE, generator: bool, autocast: bool):
    """Gradients of one training forward's loss, from a fresh copy of the model and a fixed seed."""
    model = copy.deepcopy(model)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(images(), generator=generator)
    out.loss.backward()
    return out, grads(model.vqvae), grads(model.critic), model


@pytest.mark.parametrize("loss", ["hinge", "wgan-gp"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-mixed"])
def test_critic_loss_trains_only_the_critic_and_generator_term_only_the_autoencoder(loss, autocast):
    """Generator term on or off: the critic's gradients are the same (the generator term adds none to it); the
    autoencoder's gradients with it off are the plain VQ-VAE's loss's (the critic's loss adds none to them)."""
    model = tiny_model(loss)
    off, vq_off, critic_off, _ = one_step(model, False, autocast)
    on, vq_on, critic_on, _ = one_step(model, True, autocast)
    plain = copy.deepcopy(model.vqvae)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain(images()).loss.backward()
    vq_plain = grads(plain)
    assert all(close(vq_off[n], vq_plain[n]) for n in vq_plain)
    assert all(close(critic_on[n], critic_off[n]) for n in critic_off)
    assert any(float(g.abs().max()) > 0 for g in critic_off.values())
    last = "decoder.5.weight"  # the layer that outputs pixels
    assert float((vq_on[last] - vq_off[last]).abs().max()) > 1e3 * rounding_tolerance(vq_off[last])
    assert float(on.adv_weight) > 0 and float(off.adv_weight) == 0
    assert torch.isfinite(on.loss) and float(on.d_loss) == pytest.approx(float(off.d_loss), rel=1e-6)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    model = tiny_model()
    assert last_decoder_weight(model.vqvae) is model.vqvae.decoder[-1].weight
    assert last_decoder_weight(model.vqvae).shape[1] == 1  # a transposed convolution to the image's channels
    out, _, _, copied = one_step(model, True, False)
    # by hand, on another copy from the same state and seed: .backward() into .grad of the last layer, and the
    # generator's loss through the critic with its parameters detached (functional_call, not generator_term)
    hand = copy.deepcopy(model)
    torch.manual_seed(3)
    vq = hand.vqvae(images())
    recon = vq.reconstruction
    hand.critic(torch.cat([images(), recon.detach()]))  # the critic's loss pass: one power-iteration step
    state = {n: p.detach() for n, p in hand.critic.named_parameters()}
    g_loss = -functional_call(hand.critic, state, (recon,)).mean()
    w = last_decoder_weight(hand.vqvae)
    vq.recon_loss.backward(retain_graph=True)
    g_rec = w.grad.norm()
    w.grad = None
    g_loss.backward()
    expected = 0.1 * g_rec / (w.grad.norm() + 1e-4)
    assert float(out.adv_weight) == pytest.approx(float(expected), rel=1e-4)


def test_adaptive_weight_is_clamped_and_detached():
    w = torch.randn(3, 3, requires_grad=True)
    big = adaptive_weight(1e3 * (w**2).sum(), 0 * w.sum(), w)  # no generator gradient: ratio / 1e-4, clamped
    assert float(big) == 1e4 and not big.requires_grad
    rec, g = (w**2).sum(), (3 * w).sum()
    by_hand = (2 * w).detach().norm() / (3 * 9**0.5 + 1e-4)  # grad of rec is 2w, of g is 3 everywhere
    assert float(adaptive_weight(rec, g, w)) == pytest.approx(float(by_hand), rel=1e-5)


def test_ema_codebooks_update_once_per_step_as_without_the_critic():
    """The critic sees the reconstructions only: one training forward leaves the codebooks and EMA statistics
    exactly where the plain VQ-VAE's forward leaves them (k-means init included)."""
    model = tiny_model()
    plain = copy.deepcopy(model.vqvae)
    _, _, _, stepped = one_step(model, True, False)
    torch.manual_seed(3)
    plain(images())
    for name, buf in plain.named_buffers():
        assert torch.equal(buf, dict(stepped.vqvae.named_buffers())[name]), name
    assert bool(stepped.vqvae.quantizers[0].initted)


def test_eval_mode_is_the_vqvae():
    model = tiny_model().eval()
    with torch.no_grad():
        out, ref = model(images()), model.vqvae(images())
    assert type(out).__name__ == "VQVAEOutput" and torch.equal(out.reconstruction, ref.reconstruction)
    assert model.levels == 2 and model.cfg is model.vqvae.cfg


# ---------------------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("override,message", [
    ("stage1.adversarial_weight=-0.1", "stage1.adversarial_weight=-0.1 is not allowed: must be >= 0"),
    ("stage1.adversarial_start=-1", "stage1.adversarial_start=-1 is not allowed: must be >= 0"),
    ("stage1.adversarial_loss=lsgan", "stage1.adversarial_loss='lsgan' is not allowed: choose one of hinge, wgan-gp"),
    ("stage1.critic_channels=4", "stage1.critic_channels=4 is not allowed: must be >= 8"),
])
def test_bad_adversarial_settings_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/smoke.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_adversarial_term_is_off_by_default():
    for preset in ("configs/smoke.yaml", "configs/mnist.yaml", None):
        assert load_config(preset).stage1.adversarial_weight == 0
    assert isinstance(stage1.stage1_model(load_config("configs/smoke.yaml")), VQVAE2)


# ---------------------------------------------------------------------------------------------------------
# stage 1 with the critic, and what later stages make of it


def train_log(run_dir) -> list[dict]:
    with open(run_dir / "stage1" / "logs" / "version_0" / "metrics.csv") as fh:
        return [r for r in csv.DictReader(fh) if r.get("train/loss")]


@pytest.fixture(scope="module")
def adversarial_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adversarial")
    assert run(stage1, run_dir, *ON) == 0
    return run_dir


def test_stage1_with_the_critic_trains_and_logs_the_adversarial_term(adversarial_run):
    rows = train_log(adversarial_run)
    keys = ("adv_weight", "g_loss", "d_loss", "logits_real", "logits_fake")
    assert all(r.get(f"train/{k}") not in (None, "") for r in rows for k in keys)
    by_step = {int(r["step"]): {k: float(r[f"train/{k}"]) for k in keys} for r in rows}
    assert by_step[5]["adv_weight"] == 0  # logged after step index 4: before adversarial_start
    assert all(v["adv_weight"] > 0 for s, v in by_step.items() if s > 5)
    losses = [float(r["train/recon_mse"]) for r in rows]
    assert losses[-1] < losses[0]
    ckpt = load_checkpoint(adversarial_run / "stage1" / "last.ckpt")
    assert {k.split(".")[0] for k in ckpt["model"]} == {"vqvae", "critic"}
    assert ckpt["step"] == 20 and "mse" in ckpt["metrics"]  # held-out metrics of the VQ-VAE
    assert (adversarial_run / "stage1" / "reconstructions.png").is_file()


def test_stage2_sample_and_the_exported_sampler_hold_no_critic(adversarial_run, tmp_path):
    import shutil

    from pipeline import Sampler
    from stages.runfolder import RunFolder, load_vqvae

    run_dir = tmp_path / "run"
    shutil.copytree(adversarial_run, run_dir)
    vqvae, cfg, path = load_vqvae(RunFolder(run_dir))
    state = load_checkpoint(path)["model"]
    assert cfg.stage1.adversarial_weight == 0.1
    assert all(torch.equal(v, state[f"vqvae.{k}"]) for k, v in vqvae.state_dict().items())
    assert run(stage2, run_dir, "stage2.max_steps=4") == 0
    assert run(sample, run_dir, "sample.num=8") == 0
    with safe_open(run_dir / "sampler" / "model.safetensors", "pt") as f:
        names = list(f.keys())
        exported = {k[len("vqvae."):]: f.get_tensor(k) for k in names if k.startswith("vqvae.")}
    assert names and not [k for k in names if "critic" in k or "parametrizations" in k]
    assert all(torch.equal(exported[k], v) for k, v in vqvae.state_dict().items() if k in exported)
    images_out = Sampler.from_pretrained(run_dir / "sampler").generate(4, seed=0)
    assert images_out.shape == (4, 16, 16, 1)


def test_critic_warm_up_leaves_the_autoencoder_as_without_it(adversarial_run, tmp_path):
    """Without gradient clipping (the one thing the critic's gradients share with the autoencoder's) and with the
    generator term never on, the VQ-VAE trains to the plain run's weights: the critic's loss reaches only the
    critic, and the critic changes nothing in the data order, the RNG or the codebooks."""
    short = ["stage1.max_steps=10", "stage1.grad_clip=0"]
    assert run(stage1, tmp_path / "plain", *short) == 0
    assert run(stage1, tmp_path / "warm", *short, "stage1.adversarial_weight=0.1", "stage1.adversarial_start=1000") == 0
    plain = load_checkpoint(tmp_path / "plain" / "stage1" / "last.ckpt")["model"]
    warm = load_checkpoint(tmp_path / "warm" / "stage1" / "last.ckpt")["model"]
    assert all(close(warm[f"vqvae.{k}"].float(), v.float()) for k, v in plain.items())
    assert all(float(r["train/adv_weight"]) == 0 for r in train_log(tmp_path / "warm"))


def test_resume_from_a_mid_run_checkpoint_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the generator term started (the gradient penalty draws random numbers), the same command
    again: the critic's weights, spectral-norm vectors and optimizer state resume exactly."""
    args = [*ON, "stage1.adversarial_loss=wgan-gp"]
    assert run(stage1, tmp_path / "straight", *args) == 0
    real_fit = stage1.fit

    def fit_with_ctrl_c(fabric, task, *a, **kw):
        step_fn = task.training_step

        def training_step(fabric, model, batch, step):
            if step == 12:
                os.kill(os.getpid(), signal.SIGINT)
            return step_fn(fabric, model, batch, step)

        task.training_step = training_step
        return real_fit(fabric, task, *a, **kw)

    monkeypatch.setattr(stage1, "fit", fit_with_ctrl_c)
    assert run(stage1, tmp_path / "stopped", *args) == 130
    monkeypatch.setattr(stage1, "fit", real_fit)
    last = tmp_path / "stopped" / "stage1" / "last.ckpt"
    assert load_checkpoint(last)["step"] == 13
    torch.manual_seed(123)  # whatever happened in between
    assert run(stage1, tmp_path / "stopped", *args) == 0
    assert f"resuming from {last} at step 13" in capsys.readouterr().out
    a = load_checkpoint(tmp_path / "straight" / "stage1" / "last.ckpt")
    b = load_checkpoint(last)
    assert a["step"] == b["step"] == 20 and list(a["model"]) == list(b["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the same computation: bit for bit


@pytest.mark.parametrize("first,then,message", [
    ([], ON, "stage1.adversarial_weight: 0.0 -> 0.1 switches the critic on"),
    (ON, ["stage1.adversarial_weight=0"], "stage1.adversarial_weight: 0.1 -> 0.0 switches the critic off"),
    (ON, [*ON, "stage1.critic_channels=32"], "stage1.critic_channels: 64 -> 32"),
])
def test_resume_that_switches_or_resizes_the_critic_is_one_line(tmp_path, capsys, first, then, message):
    assert run(stage1, tmp_path, "stage1.max_steps=2", *first) == 0
    before = (tmp_path / "stage1" / "last.ckpt").read_bytes()
    capsys.readouterr()
    assert run(stage1, tmp_path, "stage1.max_steps=4", *then) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert message in lines[0] and "--fresh" in lines[0]
    assert (tmp_path / "stage1" / "last.ckpt").read_bytes() == before


def test_resume_with_another_adversarial_weight_applies_it_and_says_so(adversarial_run, tmp_path, capsys):
    import shutil

    shutil.copytree(adversarial_run / "stage1", tmp_path / "stage1")
    assert run(stage1, tmp_path, "stage1.max_steps=22", "stage1.adversarial_weight=0.2",
               "stage1.adversarial_start=5") == 0
    assert "adversarial_weight 0.1 -> 0.2" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "stage1" / "last.ckpt")["train"]["adversarial_weight"] == 0.2
