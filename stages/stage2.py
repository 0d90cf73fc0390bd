"""Stage 2: extract the code grids with the trained stage-1 model, then fit one autoregressive prior per level
(top first; each lower level conditioned on the level above, all optionally class-conditional) with the
shared Fabric loop.

    python -m stages.stage2 --config configs/mnist.yaml [key=value ...]
"""

import json
import sys

import torch

from pipeline.checkpoint import LAST_CKPT, resume_point, saved_state
from pipeline.codes import CodeSet, extract_codes
from pipeline.config import Config, config_diff
from pipeline.data import ShiftedCopies
from pipeline.fabric import make_fabric, make_loggers
from pipeline.io import UserError, atomic_write_text, load_checkpoint
from pipeline.priors import normalize_spec, prior_from_spec, prior_spec
from pipeline.priors.likelihood import LN2, heldout_nll_bits, nll_sum, prior_conditions
from pipeline.training import Task, fit
from pipeline.vqvae import level_names
from stages.cli import run_main, stage_parser
from stages.runfolder import RunFolder, check_resumable, load_run_data, load_vqvae


def spec_diff(old: dict, new: dict) -> list[str]:
    """``prior.net.n_layer: 1 -> 2``, ... between two prior specs."""
    def flat(spec: dict) -> dict:
        net = {f"net.{k}": v for k, v in spec.get("net", {}).items()}
        return {**net, **{k: v for k, v in spec.items() if k != "net"}}

    return config_diff({"prior": flat(old)}, {"prior": flat(new)}, ("prior",))


def prior_task(cfg: Config, spec: dict, level: int, name: str, train: CodeSet, holdout: CodeSet,
               class_names: list[str] | None, stage1_sha256: str) -> Task:
    """What the training loop needs to fit the prior of ``level``: the model, its loss and held-out metrics."""
    torch.manual_seed(cfg.stage2.seed + level)
    drop = cfg.prior.class_dropout
    num_classes = len(class_names or [])

    def training_step(fabric, model, batch, step):
        codes, labels = batch
        target, labels, cond = prior_conditions(codes, labels, level, num_classes)
        if labels is not None and drop > 0:  # classifier-free guidance: sometimes train without the label
            labels = torch.where(torch.rand(labels.shape, device=labels.device) < drop, num_classes, labels)
        loss = nll_sum(model, target, labels, cond) / target.numel()
        return loss, {"bits_per_code": loss.detach() / LN2}

    def validate(fabric, model, step):
        metrics = {"nll_bits": heldout_nll_bits(fabric, model, holdout, level, num_classes)}
        if level > 0:
            metrics["nll_bits_shuffled_cond"] = heldout_nll_bits(fabric, model, holdout, level, num_classes,
                                                                 shuffle_cond=True)
        return metrics

    return Task(model=prior_from_spec(spec), train_set=train, training_step=training_step, validate=validate,
                best_metric="nll_bits", units="tok", count_units=lambda b: b[0][level].numel(),
                progress_keys=("bits_per_code",), log_prefix=f"{name}/", num_workers=cfg.data.num_workers,
                meta={"config": cfg.to_dict(), "prior": spec, "level": name, "level_index": level,
                      "stage1_sha256": stage1_sha256, "class_names": class_names, "stage": "stage2"})


def run_stage2(cfg: Config, run: RunFolder, fresh: bool = False) -> dict:
    vqvae, cfg1, stage1_path = load_vqvae(run)
    names = level_names(vqvae.levels)
    fabric = make_fabric(cfg.fabric, loggers=make_loggers(run.stage2))

    # every rank encodes its own part of the images (streamed, or from stage 1's data cache that rank 0 prepares)
    data = load_run_data(cfg1.data, run, fabric)
    meta = load_checkpoint(stage1_path)["meta"]  # class names: older checkpoints have only their number
    class_names = meta.get("class_names") or ([str(i) for i in range(meta["num_classes"])]
                                              if meta.get("num_classes") else None)
    ex = cfg.extract  # shifted copies add code grids for priors short of data (extract.copies)
    train_images = ShiftedCopies(data.train, ex.copies, ex.shift, cfg.stage2.seed) if ex.copies else data.train
    manifest = extract_codes(vqvae.to(fabric.device), stage1_path, train_images, data.holdout, run.codes, class_names,
                             names, cfg1.data.image_size, ex.batch_size, ex.shard_size, fabric.device,
                             log=fabric.print, fabric=fabric)
    train, holdout = CodeSet(run.codes, "train", manifest), CodeSet(run.codes, "holdout", manifest)
    num_classes = manifest["num_classes"] if cfg.prior.class_conditional else 0
    if cfg.prior.class_conditional and manifest["num_classes"] == 0:
        raise UserError("prior.class_conditional=true but the data has no labels; set prior.class_conditional=false")
    grids, k, sha = manifest["grids"], manifest["num_codes"], manifest["stage1_sha256"]
    summary: dict = {"stage1_sha256": sha, "levels": {}}
    for level, name in enumerate(names):
        net = cfg.prior.net_for(name)
        spec = prior_spec(net, grids[level], k, num_classes, grids[level - 1] if level else None, k if level else 0,
                          cfg.prior.window_for(name))
        last = run.prior(name) / LAST_CKPT
        point = resume_point(last, prefer_sharded=cfg.fabric.strategy == "fsdp")
        if point is not None and not fresh:
            meta = saved_state(point)["meta"]
            check_resumable(last, [f"stage-1 sha256 {meta.get('stage1_sha256', '?')[:12]} -> {sha[:12]}"]
                            if meta.get("stage1_sha256") != sha else [], "stage-1 model", "stage2")
            trained = normalize_spec(meta["prior"]) if meta.get("prior") else {}
            check_resumable(last, spec_diff(trained, spec), "prior config", "stage2")
        class_names = (manifest.get("class_names") or [str(i) for i in range(num_classes)]) if num_classes else None
        task = prior_task(cfg, spec, level, name, train, holdout, class_names, sha)
        n_params = sum(p.numel() for p in task.model.parameters())
        fabric.print(f"stage 2, {name} prior: {net.kind} ({n_params / 1e6:.2f}M parameters) over {grids[level]} codes"
                     + (f" given the {names[level - 1]} codes" if level else "")
                     + (f" ({spec['cond_window']}x{spec['cond_window']} window)" if spec["cond_window"] else "")
                     + (f", {num_classes} classes" if num_classes else ", unconditional"))
        summary["levels"][name] = fit(fabric, task, cfg.stage2, run.prior(name), fresh=fresh,
                                      desc=f"stage 2 {name}")
    if fabric.global_rank == 0:
        atomic_write_text(run.stage2_summary, json.dumps(summary, indent=1))
        for name, m in summary["levels"].items():
            extra = f" (shuffled {names[names.index(name) - 1]} codes: {m['nll_bits_shuffled_cond']:.3f})" \
                if "nll_bits_shuffled_cond" in m else ""
            fabric.print(f"stage 2 done: {name} prior held-out NLL {m.get('nll_bits', float('nan')):.3f} bits/code"
                         + extra)
    return summary


def main(argv=None) -> int:
    parser = stage_parser(
        "stage2",
        "Stage 2: extract the code grids with the stage-1 model (RUN/codes/), then train one prior per level, "
        "top first (RUN/stage2/<level>/).",
        ("fabric", "prior", "extract", "stage2"), fresh=True,
        example="stage2.max_steps=500 prior.top.n_layer=6",
    )
    return run_main(lambda cfg, run, args: run_stage2(cfg, run, fresh=args.fresh), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
