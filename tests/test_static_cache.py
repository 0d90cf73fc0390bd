"""Sampling a GPT prior with transformers' StaticCache (``sample.kv_cache=static``) and a compiled one-code step
(``sample.compile``): the same logits as the dynamic cache within rounding, the same codes where the logits' margins
say rounding cannot flip them, and the sample stage's images unchanged."""

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.io import UserError
from pipeline.priors import Decoding
from pipeline.priors.gpt import GPTPrior
from pipeline.sampler import Sampler
from pipeline.sampling import image_uniforms, sample_level
from stages import sample
from tests.conftest import assert_same_images, copy_run, rounding_tolerance, run

K, KC, C, B = 16, 12, 3, 6
GUIDANCE = 2.0  # guided logits u + g (c - u): a rounding error e in c and u is at most (2g - 1) e in them
CASES = {  # (arch, conditioned on top codes, conditioning window)
    "top, class-conditional": ("gpt2", False, 0),
    "bottom on top codes, llama": ("llama", True, 0),
    "bottom on a 3x3 window of top codes": ("gpt2", True, 3),
}


def make_prior(case: str, dtype: torch.dtype) -> GPTPrior:
    arch, bottom, window = CASES[case]
    torch.manual_seed(0)
    cond = dict(cond_grid=(2, 3), cond_num_codes=KC, cond_window=window) if bottom else {}
    return GPTPrior((4, 4), K, C, arch=arch, n_layer=2, n_embd=32, n_head=4, **cond).eval().to(dtype)


def greedy_with_logits(prior: GPTPrior, decoding: Decoding) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (B, T) sampled greedily with labels and guidance (and top codes for a bottom prior), and every step's
    raw logits (T, 2B, K): rows [0, B) conditional, [B, 2B) with the null label."""
    seen, step = [], prior.step
    prior.step = lambda state, t, prev: (seen.append(out := step(state, t, prev)), out)[1]
    top = torch.randint(0, KC, (B, 2, 3), generator=torch.Generator().manual_seed(1)) if prior.cond_grid else None
    try:
        codes = sample_level(prior, image_uniforms(0, 0, range(B), prior.seq_len), torch.arange(B) % C, top,
                             top_k=1, guidance=GUIDANCE, decoding=decoding)
    finally:
        del prior.step
    return codes.flatten(1), torch.stack(seen).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_static_cache_gives_the_dynamic_caches_logits_and_codes(case, dtype):
    prior = make_prior(case, dtype)
    codes, logits = greedy_with_logits(prior, Decoding("dynamic"))
    static_codes, static_logits = greedy_with_logits(prior, Decoding("static"))
    tol = rounding_tolerance(logits.to(dtype))
    # a cache that skipped or repeated a position would give the logits of the step beside: far beyond the tolerance
    one_off = (logits[1:] - logits[:-1]).abs().flatten(1).amax(1)  # (T - 1,)
    assert (one_off > tol).float().mean() >= 0.5, "the tolerance would not see a cache one position off"
    # greedy codes must agree where the top two guided logits are further apart than rounding can move them
    cond, uncond = logits.chunk(2, dim=1)
    top2 = (uncond + GUIDANCE * (cond - uncond)).topk(2, dim=-1).values  # (T, B, 2)
    safe = ((top2[..., 0] - top2[..., 1]) > 2 * (2 * GUIDANCE - 1) * tol).all(0)  # (B,)
    same = (codes == static_codes).all(1)
    assert same[safe].all(), f"rows {torch.nonzero(safe & ~same).flatten().tolist()} differ with margins to spare"
    assert same.sum() >= B // 2, f"only {int(same.sum())} of {B} rows agree"
    rows = torch.cat([same, same])  # a row's logits are comparable while its codes agree: up to the end here
    assert (logits[:, rows] - static_logits[:, rows]).abs().max() <= tol


def cache_after_prefix(prior: GPTPrior, decoding: Decoding):
    return prior.begin(B, torch.arange(B) % C, None, decoding=decoding).past


def test_the_static_cache_is_preallocated_to_every_position_of_the_level():
    prior = make_prior("top, class-conditional", torch.float32)
    static = cache_after_prefix(prior, Decoding("static"))
    assert [tuple(layer.keys.shape) for layer in static.layers] == [(B, 4, prior.n_positions, 8)] * 2
    assert cache_after_prefix(prior, Decoding("dynamic")).layers[0].keys.shape[2] == 1  # the prefix only


@torch.no_grad()
def test_the_compiled_step_gives_the_eager_logits_and_compiles_once():
    """The tiniest prior (one block, width 8, 2 x 2 grid): compiling costs tens of seconds on a CPU whatever the
    size. Every step after the prefix has the same shapes, so one graph serves them all."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    prior = GPTPrior((2, 2), 4, C, n_layer=1, n_embd=8, n_head=1).eval()
    codes = torch.randint(0, 4, (2, prior.seq_len), generator=torch.Generator().manual_seed(2))

    def teacher_forced(decoding: Decoding) -> torch.Tensor:  # (T, 2, K), both fed the same codes
        state, prev, out = prior.begin(2, torch.tensor([0, C]), None, decoding=decoding), None, []
        for t in range(prior.seq_len):
            out.append(prior.step(state, t, prev))
            prev = codes[:, t]
        return torch.stack(out)

    eager = teacher_forced(Decoding("static"))
    torch._dynamo.reset()
    counters.clear()
    compiled = teacher_forced(Decoding("static", compile=True))
    assert (compiled - eager).abs().max() <= rounding_tolerance(eager)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_bad_kv_cache_and_compile_values_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^sample.kv_cache='paged' is not allowed: choose one of dynamic, static$"):
        load_config("configs/smoke.yaml", ["sample.kv_cache=paged"])
    with pytest.raises(ConfigError, match=r"^sample.compile=True is not allowed: it needs sample.kv_cache=static"):
        load_config("configs/smoke.yaml", ["sample.compile=true"])
    assert load_config("configs/smoke.yaml", ["sample.compile=true", "sample.kv_cache=static"]).sample.compile
    with pytest.raises(ValueError, match=r"^kv_cache='paged' is not allowed"):
        Decoding("paged")


def test_the_sample_stage_with_a_static_cache_draws_the_same_images(smoke_run, tmp_path):
    run_dir = copy_run(smoke_run, tmp_path / "run")
    assert run(sample, run_dir, "sample.kv_cache=static") == 0
    with np.load(smoke_run / "samples" / "samples.npz") as a, np.load(run_dir / "samples" / "samples.npz") as b:
        assert_same_images(a["images"], [a["codes_top"], a["codes_bottom"]], b["images"],
                           [b["codes_top"], b["codes_bottom"]])
    with pytest.raises(UserError, match=r"^kv_cache='paged' is not allowed"):
        Sampler.from_pretrained(run_dir / "sampler").generate_samples(1, kv_cache="paged")
