"""Stage 2: extract the code grids with the trained stage-1 model, then fit one autoregressive prior per level
(top first; each lower level conditioned on the level above, all optionally class-conditional) with the
shared Fabric loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.codes import CodeSet, extract_codes, load_manifest
from pipeline.config import Config
from pipeline.data import load_image_data
from pipeline.distributed import on_rank_zero, shard_batches
from pipeline.io import UserError, atomic_write_text, load_checkpoint
from pipeline.priors import Prior, prior_from_spec, prior_spec
from pipeline.stage1 import level_names, load_vqvae
from pipeline.training import Task, fit, make_fabric, make_loggers

LN2 = math.log(2.0)


def prior_conditions(codes: list[torch.Tensor], labels: torch.Tensor, level: int, num_classes: int):
    """(target codes, labels or None, conditioning codes or None) for the prior of ``level`` (0 = top)."""
    target = codes[level]
    cond = codes[level - 1] if level > 0 else None
    return target, (labels if num_classes > 0 else None), cond


def nll_sum(prior: Prior, target: torch.Tensor, labels, cond) -> torch.Tensor:
    """Summed negative log-likelihood (nats) of the target codes."""
    logits = prior(target, labels, cond)  # (B, T, K)
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="sum")


@torch.no_grad()
def heldout_nll_bits(fabric, prior: Prior, holdout: CodeSet, level: int, num_classes: int, batch_size: int = 256,
                     shuffle_cond: bool = False) -> float:
    """Held-out NLL in bits per code, sharded over ranks and summed. ``shuffle_cond`` pairs every grid with
    the conditioning codes of another image (a check that the conditioning is used)."""
    rank, world = fabric.global_rank, fabric.world_size
    total = torch.zeros((), dtype=torch.float64, device=fabric.device)
    count = torch.zeros((), dtype=torch.float64, device=fabric.device)
    for idx, real in shard_batches(len(holdout), rank, world, batch_size):
        codes, labels = fabric.to_device(holdout.__getitems__(idx))
        target, labels, cond = prior_conditions(codes, labels, level, num_classes)
        if shuffle_cond and cond is not None:
            cond = cond.roll(1, dims=0)
        nll = nll_sum(prior, target, labels, cond).double()  # on every rank equally often (FSDP)
        if real:
            total += nll
            count += target.numel()
    if world > 1:
        total, count = fabric.all_reduce(total, reduce_op="sum"), fabric.all_reduce(count, reduce_op="sum")
    return float(total / count / LN2)


def load_prior(run_dir: Path, level: str, which: str = "best", map_location="cpu") -> tuple[Prior, dict]:
    path = Path(run_dir) / "stage2" / level / f"{which}.ckpt"
    if not path.exists():
        path = path.with_name("last.ckpt")
    if not path.exists():
        raise UserError(f"no stage-2 checkpoint for the {level} prior in {path.parent}; run `make stage2` "
                        f"(python -m stages.stage2 --run {run_dir}) first")
    ckpt = load_checkpoint(path, map_location)
    prior = prior_from_spec(ckpt["meta"]["prior"])
    prior.load_state_dict(ckpt["model"])
    return prior.eval(), ckpt["meta"]


def check_priors_match(stage1_path: Path, metas: list[dict], run_dir: Path) -> None:
    """Refuse priors fitted to the codes of another stage-1 checkpoint: their samples would be codes this
    decoder does not share (garbage images, or an index error with another codebook size)."""
    from pipeline.codes import file_sha256

    sha = file_sha256(stage1_path)
    for meta in metas:
        if meta.get("stage1_sha256") != sha:
            raise UserError(f"the {meta.get('level', '?')} prior in {Path(run_dir) / 'stage2'} was trained on the "
                            f"codes of another stage-1 model than {stage1_path}; retrain the priors: make stage2 "
                            f"ARGS=--fresh (python -m stages.stage2 --run {run_dir} --fresh)")


def run_stage2(cfg: Config, run_dir: Path, fresh: bool = False) -> dict:
    run_dir = Path(run_dir)
    vqvae, cfg1, stage1_path = load_vqvae(run_dir)
    names = level_names(vqvae.levels)
    fabric = make_fabric(cfg.fabric, loggers=make_loggers(run_dir / "stage2"))
    codes_dir = run_dir / "codes"

    def extract() -> None:  # rank 0 writes the codes; the others read them once it is done
        data = load_image_data(cfg1.data)  # stage 1's data settings, from its checkpoint
        num_classes = load_checkpoint(stage1_path)["meta"].get("num_classes", 0)
        extract_codes(vqvae.to(fabric.device), stage1_path, data.train, data.holdout, codes_dir, num_classes, names,
                      cfg1.data.image_size, cfg.stage2.extract_batch_size, cfg.stage2.shard_size, fabric.device,
                      log=fabric.print)

    on_rank_zero(fabric, extract)  # its broadcast is the barrier; a failure on rank 0 stops every rank clearly
    manifest = load_manifest(codes_dir)
    train, holdout = CodeSet(codes_dir, "train", manifest), CodeSet(codes_dir, "holdout", manifest)
    num_classes = manifest["num_classes"] if cfg.prior.class_conditional else 0
    if cfg.prior.class_conditional and manifest["num_classes"] == 0:
        raise UserError("prior.class_conditional=true but the data has no labels; set prior.class_conditional=false")
    grids, k = manifest["grids"], manifest["num_codes"]
    summary: dict = {"stage1_sha256": manifest["stage1_sha256"], "levels": {}}
    for level, name in enumerate(names):
        net = cfg.prior.top if level == 0 else cfg.prior.bottom
        spec = prior_spec(net, grids[level], k, num_classes, grids[level - 1] if level else None, k if level else 0)
        out_dir = run_dir / "stage2" / name
        last = out_dir / "last.ckpt"
        if last.exists() and not fresh:
            meta = load_checkpoint(last)["meta"]
            if meta.get("prior") != spec or meta.get("stage1_sha256") != manifest["stage1_sha256"]:
                what = "stage-1 model" if meta.get("stage1_sha256") != manifest["stage1_sha256"] else "prior config"
                raise UserError(f"{last} was trained for a different {what}; use --fresh (make stage2 ARGS=--fresh) "
                                "to retrain the priors, or another RUN folder")
        torch.manual_seed(cfg.stage2.seed + level)
        prior = prior_from_spec(spec)
        n_params = sum(p.numel() for p in prior.parameters())
        fabric.print(f"stage 2, {name} prior: {net.kind} ({n_params / 1e6:.2f}M parameters) over {grids[level]} codes"
                     + (f" given the {names[level - 1]} codes" if level else "")
                     + (f", {num_classes} classes" if num_classes else ", unconditional"))
        drop = cfg.prior.class_dropout

        def training_step(fabric, model, batch, step, level=level, drop=drop):
            codes, labels = batch
            target, labels, cond = prior_conditions(codes, labels, level, num_classes)
            if labels is not None and drop > 0:  # classifier-free guidance: sometimes train without the label
                labels = torch.where(torch.rand(labels.shape, device=labels.device) < drop, num_classes, labels)
            loss = nll_sum(model, target, labels, cond) / target.numel()
            return loss, {"bits_per_code": loss.detach() / LN2}

        def validate(fabric, model, step, level=level):
            metrics = {"nll_bits": heldout_nll_bits(fabric, model, holdout, level, num_classes)}
            if level > 0:
                metrics["nll_bits_shuffled_cond"] = heldout_nll_bits(fabric, model, holdout, level, num_classes,
                                                                     shuffle_cond=True)
            return metrics

        task = Task(model=prior, train_set=train, training_step=training_step, validate=validate,
                    best_metric="nll_bits", units="tok", count_units=lambda b, level=level: b[0][level].numel(),
                    progress_keys=("bits_per_code",), log_prefix=f"{name}/",
                    meta={"config": cfg.to_dict(), "prior": spec, "level": name, "level_index": level,
                          "stage1_sha256": manifest["stage1_sha256"], "stage": "stage2"})
        metrics = fit(fabric, task, cfg.stage2, out_dir, fresh=fresh, desc=f"stage 2 {name}")
        summary["levels"][name] = metrics
    if fabric.global_rank == 0:
        atomic_write_text(run_dir / "stage2" / "summary.json", json.dumps(summary, indent=1))
        for name, m in summary["levels"].items():
            extra = f" (shuffled {names[names.index(name) - 1]} codes: {m['nll_bits_shuffled_cond']:.3f})" \
                if "nll_bits_shuffled_cond" in m else ""
            fabric.print(f"stage 2 done: {name} prior held-out NLL {m.get('nll_bits', float('nan')):.3f} bits/code"
                         + extra)
    return summary

