"""Sharing a trained model: the Hub mixin's save/load, the model card of the exported sampler, TensorBoard logs."""

import json

import numpy as np
import pytest
import torch

from pipeline.io import UserError
from pipeline.sampler import Sampler
from stages import evaluate, sample, stage1
from tests.conftest import copy_run, run


def test_save_pretrained_and_from_pretrained_are_the_hub_mixins(smoke_run, tmp_path):
    from huggingface_hub import ModelHubMixin

    loaded = Sampler.from_pretrained(smoke_run / "sampler")
    assert isinstance(loaded, ModelHubMixin) and Sampler.push_to_hub is ModelHubMixin.push_to_hub
    again = Sampler.from_pretrained(loaded.save_pretrained(tmp_path / "again"))
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["README.md", "config.json",
                                                                      "model.safetensors", "samples.png"]
    assert again.card == loaded.card and again.sampling_defaults == loaded.sampling_defaults
    a = loaded.generate(6, seed=4, labels=[3, 7])
    assert np.array_equal(a, again.generate(6, seed=4, labels=[3, 7]))  # the same tensors and computation: exact
    # the card's picture is drawn from the saved model with its defaults, so both folders show the same samples
    old, new = (np.asarray(__import__("PIL.Image").Image.open(f / "samples.png"))
                for f in (smoke_run / "sampler", tmp_path / "again"))
    assert old.shape == new.shape and np.abs(old.astype(int) - new.astype(int)).max() <= 1


def test_from_pretrained_of_a_repo_id_uses_the_hub_cache(tmp_path):
    """A "user/model" name that is not a folder here is a Hub repo id: offline and not cached, one clear line."""
    with pytest.raises(UserError, match="cannot download the sampler 'nobody/no-such-sampler' from the Hugging Face"):
        Sampler.from_pretrained("nobody/no-such-sampler", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(UserError, match="has no config.json"):  # a path, not a repo id: the local message
        Sampler.from_pretrained(tmp_path / "missing" / "sampler")


def _front_matter(text: str) -> dict:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_before_and_after_evaluation(smoke_run, tmp_path):
    from huggingface_hub import ModelCard

    run_dir = copy_run(smoke_run, tmp_path / "run")
    folder = run_dir / "sampler"
    assert run(sample, run_dir) == 0  # new samples: an evaluation of the shared run's older ones no longer holds
    before = (folder / "README.md").read_text()
    assert "Not evaluated yet" in before and "metrics" not in _front_matter(before)
    assert run(evaluate, run_dir) == 0
    text = (folder / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "pipeline" and "license" in meta and "vq-vae-2" in meta["tags"]
    assert {"fid", "kid", "precision", "recall"} <= set(meta["metrics"])
    assert ModelCard.load(folder / "README.md").data.library_name == "pipeline"  # the Hub's own parser
    for section in ("## The model", "## Training", "## Evaluation", "## Use", "![samples](samples.png)"):
        assert section in text, section
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert f"| fid | {report['fid']:.4g} [" in text and f"| {report['real_floor']['fid']:.4g} [" in text
    assert f"`{report['feature_extractor']}` extractor" in text
    config = json.loads((folder / "config.json").read_text())
    assert config["card"]["evaluation"]["fid"] == report["fid"]
    steps = {part: t["steps"] for part, t in config["card"]["training"].items()}
    assert steps == {"stage 1": 20, "top prior": 20, "bottom prior": 20}  # configs/smoke.yaml's max_steps
    assert all(t["seconds"] > 0 for t in config["card"]["training"].values())
    assert "| top | 2 x 2 | 32 codes x 8 |" in text and "Classes (10): 0, 1" in text
    sampler = Sampler.from_pretrained(folder)  # the sha256 of the weights still holds after the card changed
    assert sampler.card["evaluation"]["fid"] == report["fid"]
    # the grid image the card shows: one row per class, 8 samples each, at scale 2
    from PIL import Image

    grid = Image.open(folder / "samples.png")
    assert grid.height == 10 * 2 * (2 + 16 + 2) and grid.width > 2 * (2 + 8 * (16 + 2))  # 2-px gaps, scale 2


def test_resume_of_a_checkpoint_without_training_time(smoke_run, tmp_path):
    """Checkpoints written before the training time was kept still resume, and count time from then on."""
    run_dir = copy_run(smoke_run, tmp_path / "run", parts=("config.yaml", "stage1"))
    last = run_dir / "stage1" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    del state["seconds"]
    torch.save(state, last)
    assert run(stage1, run_dir, "stage1.max_steps=22") == 0
    resumed = torch.load(last, weights_only=True)
    assert resumed["step"] == 22 and resumed["seconds"] > 0


def test_tensorboard_logs_of_both_stages(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tags(folder):  # every event file of the run's folder, as TensorBoard reads them (stage 2 writes one per prior)
        acc = EventAccumulator(str(folder / "tensorboard" / "version_0"), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        return acc

    s1 = tags(smoke_run / "stage1")
    scalars = set(s1.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/usage_top", "train/perplexity_bottom", "val/mse"} <= scalars
    assert [e.step for e in s1.Scalars("val/mse")] == [10, 20]  # configs/smoke.yaml: eval_every 10, 20 steps
    images = s1.Images("val/reconstructions")
    assert [e.step for e in images] == [10, 20] and images[-1].width > 0
    s2 = tags(smoke_run / "stage2")
    assert {"top/train/loss", "top/val/nll_bits", "bottom/val/nll_bits"} <= set(s2.Tags()["scalars"])
