"""The model card of an exported sampler: the folder's ``README.md``, with the Hugging Face Hub's YAML front matter
(library, tags, license, datasets, metrics), what the model is, how it was trained, how good it is, a sample grid
and the lines that load it.

Everything it says comes from ``config.json``: the architecture, plus a ``card`` section of facts the stages record
(data, training steps and wall time, hardware, the evaluation report), so a card rendered again anywhere, e.g. by
``push_to_hub`` of a loaded sampler, says the same.
"""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from typing import Any

import yaml

from pipeline.metrics.report import floor_images, metrics_table

GRID = "samples.png"
LIBRARY = "pipeline"
TAGS = ["vq-vae-2", "vqvae", "autoregressive", "image-generation"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str = "cpu") -> str:
    """This machine in a few words: the GPU when training used one, else the CPU and its cores; torch's version."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        where = f"{cpu_name()} ({os.cpu_count()} cores)"
    return f"{where}, torch {torch.__version__}"


def today() -> str:
    return datetime.now(timezone.utc).date().isoformat()


# ----------------------------------------------------------------------------------------------------------
def front_matter(config: dict[str, Any]) -> str:
    card = config.get("card") or {}
    hub = (card.get("data") or {}).get("hub_dataset")
    meta: dict[str, Any] = {
        "library_name": LIBRARY,
        "license": "other",  # the weights inherit the data's terms: set your licence before sharing
        "pipeline_tag": "unconditional-image-generation",
        "tags": TAGS + (["class-conditional"] if config.get("class_names") else []),
    }
    if hub:
        meta["datasets"] = [hub]
    if card.get("evaluation"):
        meta["metrics"] = ["fid", "kid", "precision", "recall", "inception_score"]
    return ("---\n# license: set the licence of these weights (they inherit the terms of the training data)\n"
            + yaml.safe_dump(meta, sort_keys=False) + "---\n")


def _model_section(config: dict[str, Any]) -> list[str]:
    vq, names = config["vqvae"], config["class_names"]
    lines = ["## The model", "",
             f"A {len(config['levels'])}-level VQ-VAE-2 for {config['image_size']} x {config['image_size']} images "
             f"with {config['in_channels']} channel(s), and one autoregressive prior per level (the top prior "
             "first; each lower level's prior is conditioned on the codes above it).", "",
             "| level | code grid | codebook | prior |", "|---|---|---|---|"]
    for name, spec in zip(config["levels"], config["priors"]):
        net = spec["net"]
        kind = (f"GPT-2, {net['n_layer']} layers x {net['n_embd']}" if net.get("kind") == "gpt"
                else ", ".join(f"{k} {v}" for k, v in net.items()))
        lines.append(f"| {name} | {spec['grid'][0]} x {spec['grid'][1]} | {vq['codebook_size']} codes x "
                     f"{vq['code_dim']} | {kind} |")
    params = (config.get("card") or {}).get("parameters")
    if params:
        lines += ["", "Parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items()) + "."]
    lines += ["", f"Classes ({len(names)}): {', '.join(names)}." if names else "Unconditional (no classes).", ""]
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _training_section(card: dict[str, Any]) -> list[str]:
    data, train = card.get("data") or {}, card.get("training") or {}
    if not data and not train:
        return []
    lines = ["## Training", ""]
    if data:
        lines.append(f"Data: {data.get('description', '?')}; {data.get('train', '?')} training images, "
                     f"{data.get('holdout', '?')} held out ({data.get('holdout_source', '?')}).")
    if train:
        lines += ["", "| part | steps | wall time |", "|---|---|---|"]
        lines += [f"| {part} | {t['steps']} | {_duration(t['seconds'])} |" for part, t in train.items()]
    if card.get("prior_nll_bits"):
        lines += ["", "Held-out NLL of the priors (bits per code): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in card["prior_nll_bits"].items()) + "."]
    lines += ["", f"Hardware: {card.get('hardware', '?')}; trained {card.get('date', '?')}.", ""]
    return lines


def _evaluation_section(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return ["## Evaluation", "", "Not evaluated yet: `make evaluate` on the run folder adds the numbers here.", ""]
    s = report.get("sampling") or {}
    lines = ["## Evaluation", "",
             f"{report['num_samples']} samples against {report['num_samples']} real training images, in the features "
             f"of the `{report['feature_extractor']}` extractor; the real floor is {floor_images(report)} "
             "against the same reference (what a perfect model would score at this N). "
             "[brackets]: 95% bootstrap intervals.", "", *metrics_table(report), ""]
    recon = report.get("recon") or {}
    if recon:
        lines += [f"Reconstruction of held-out images: MSE {recon['mse']:.4g} (on [-1, 1]), PSNR {recon['psnr']:.2f} "
                  f"dB, rFID {recon['rfid']:.3g}.", ""]
    per = report.get("per_class")
    if per:
        lines += [f"Samples the domain classifier recognises as the class asked for: {per['asked_class_accuracy']:.1%} "
                  f"(real held-out images: {per['real_accuracy']:.1%}).", ""]
    if judged := report.get("per_class_independent"):
        lines += [f"An independent judge ({judged['judge']}) recognises {judged['asked_class_accuracy']:.1%} "
                  f"(real held-out images: {judged['real_accuracy']:.1%}).", ""]
    if s:
        lines += ["Sampling settings: " + ", ".join(f"{k} = {v}" for k, v in s.items()) + ".", ""]
    return lines


def _usage_section(config: dict[str, Any]) -> list[str]:
    d = config.get("sampling_defaults") or {}
    label = f"labels={config['class_names'][0]!r}, " if config.get("class_names") else ""
    settings = ", ".join(f"{k}={d[k]!r}" for k in ("temperature", "top_k", "top_p", "guidance") if k in d)
    return ["## Use", "", "```python", "from pipeline import Sampler", "",
            'sampler = Sampler.from_pretrained(".")  # this folder, or its Hub repo id',
            f"images = sampler.generate(16, {label}{settings}{', ' if settings else ''}seed=0)"
            "  # uint8 (16, H, W, C)", "```", "",
            "Encode your own images to codes and back: `sampler.decode(sampler.encode(sampler.load_images(paths)))`; "
            "from the shell: `python -m pipeline.generate --sampler . --num 16 --out samples.png`, "
            "`python -m pipeline.generate reconstruct --sampler . --in image.png --out recon.png`; "
            "a local page: `python -m pipeline.demo --sampler .`.", ""]


def render(config: dict[str, Any]) -> str:
    """The model card (``README.md``) of the sampler described by ``config`` (its ``config.json``)."""
    card = config.get("card") or {}
    title = card.get("name") or "sampler"
    lines = [f"# VQ-VAE-2 image generator: {title}", "",
             "Made with the `pipeline` package (hierarchical VQ-VAE-2 + autoregressive priors). Samples from this "
             "model with its default settings (one row per class when it has classes):", "",
             f"![samples]({GRID})", "",
             *_model_section(config), *_training_section(card), *_evaluation_section(card.get("evaluation")),
             *_usage_section(config),
             "## Files", "",
             "`config.json` (architecture, sampling defaults, these facts, the sha256 of the weights), "
             "`model.safetensors` (the VQ-VAE-2 and the priors; no pickle), `samples.png`. Loading checks the "
             "sha256 and never runs code from the folder.", ""]
    return front_matter(config) + "\n" + "\n".join(lines)
