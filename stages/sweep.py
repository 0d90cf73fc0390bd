"""The truncation trade-off (``make sweep``): sample at several temperatures and top-p values, score each
setting with FID, precision and recall against the same real reference, and plot precision against recall
(Kynkaanniemi et al. 2019: lower temperature or a smaller nucleus buys precision with recall).

    python -m stages.sweep --config configs/mnist.yaml [key=value ...]
"""

import json
import sys
import time

import torch

from pipeline.config import Config
from pipeline.data import real_provenance, seeded_subset
from pipeline.distributed import gather_rows, on_rank_zero, rank_zero_first, shard_indices
from pipeline.fabric import make_fabric
from pipeline.io import atomic_write_text
from pipeline.metrics import fid_from_features, precision_recall
from pipeline.metrics.extract import features_of, make_extractor, reference_features
from pipeline.metrics.report import per_class_accuracy, sweep_plot
from pipeline.rejection import asked_class_probability, candidates_for, select_accepted
from stages.cli import run_main, stage_parser
from stages.runfolder import RunFolder, build_sampler, load_run_data


def sweep_settings(cfg: Config) -> list[dict]:
    base = {"temperature": 1.0, "top_k": cfg.sample.top_k, "top_p": 1.0}
    out = [dict(base, temperature=t) for t in cfg.sweep.temperatures]
    out += [dict(base, top_p=p) for p in cfg.sweep.top_p if p < 1.0]
    out += [dict(base, guidance=g) for g in cfg.sweep.guidance]
    out += [dict(base, accept=a) for a in cfg.sweep.accept]
    return out


def vary(setting: dict) -> str:
    """The knob a setting turns: temperature, top_p, guidance or accept (the others at their base values)."""
    for knob in ("accept", "guidance"):
        if knob in setting:
            return knob
    return "temperature" if setting["top_p"] == 1.0 else "top_p"


def run_sweep(cfg: Config, run: RunFolder) -> list[dict] | None:
    t0 = time.perf_counter()
    sampler, cfg1 = build_sampler(run)
    fabric = make_fabric(cfg.fabric)
    sampler = sampler.to(fabric.device)
    data = load_run_data(cfg1.data, run, fabric)
    # rank 0 trains (or loads) and caches the domain classifier, then the others load that file
    extractor, _ = rank_zero_first(fabric, lambda: make_extractor(cfg.sweep.extractor, cfg.evaluate, run.classifier,
                                                                  data, log=fabric.print, device=fabric.device))
    e, s = cfg.evaluate, cfg.sample
    n = min(cfg.sweep.num, len(data.train), len(data.holdout))
    f_ref, _ = reference_features(fabric, extractor, lambda: seeded_subset(data.train, n, seed=0), n, e.batch_size,
                                  run.reference_cache, real_provenance(data, cfg1.data, "train"), "reference")
    f_held, l_held = reference_features(fabric, extractor, lambda: data.holdout.all_pixels(n), n, e.batch_size,
                                        run.reference_cache, real_provenance(data, cfg1.data, "holdout"), "held-out")
    held_labels = data.holdout.labels[:n].numpy()
    results = []
    settings = sweep_settings(cfg)
    if any("accept" in x for x in settings) and not (sampler.num_classes and extractor.has_logits):
        fabric.print("sweep: rejection sampling (sweep.accept) needs a class-conditional prior and the domain "
                     "classifier; skipped")
        settings = [x for x in settings if "accept" not in x]
    for setting in settings:
        m = candidates_for(n, setting.get("accept", 1.0))  # samples drawn for n kept
        indices = shard_indices(m, fabric.global_rank, fabric.world_size)
        part = sampler.generate_samples(len(indices), setting["temperature"], setting["top_k"], setting["top_p"],
                                        s.labels, setting.get("guidance", s.guidance), s.seed, s.batch_size,
                                        indices=indices)
        pixels = torch.from_numpy(part.images).permute(0, 3, 1, 2)  # this rank's (n_rank, H, W, C) -> NCHW
        f_fake, l_fake = features_of(fabric, extractor, pixels, m, e.batch_size, "samples", sharded=True)
        labels = gather_rows(fabric, [part.labels], m)  # every rank takes part; rank 0 gets them in order
        if fabric.global_rank == 0:
            labels = labels[0]
            if m > n:  # keep the n most typical of their asked class
                keep = select_accepted(asked_class_probability(l_fake, labels), labels, n)
                f_fake, l_fake, labels = f_fake[keep], l_fake[keep], labels[keep]
            r = {**setting, "vary": vary(setting), "sampled_per_kept": m / n,
                 "fid": fid_from_features(f_ref, f_fake), **precision_recall(f_ref, f_fake, k=e.k)}
            per = per_class_accuracy(l_fake, labels, l_held, held_labels, data.class_names)
            r["asked_class_accuracy"] = per["asked_class_accuracy"] if per else None
            results.append(r)
            asked = f", asked class {per['asked_class_accuracy']:.1%}" if per else ""
            how = (f"accept {setting['accept']:g} ({m} sampled)" if "accept" in setting else
                   f"guidance {setting['guidance']:g}" if "guidance" in setting else
                   f"T={r['temperature']:g} top_p={r['top_p']:g}")
            fabric.print(f"sweep: {how}: FID {r['fid']:.3g}, precision {r['precision']:.3f}, recall "
                         f"{r['recall']:.3f}{asked}")

    def write() -> list[dict]:  # rank 0 only
        floor = {"fid": fid_from_features(f_ref, f_held), **precision_recall(f_ref, f_held, k=e.k)}
        held_share = per_class_accuracy(l_held, held_labels, l_held, held_labels, data.class_names)
        floor["asked_class_accuracy"] = held_share["real_accuracy"] if held_share else None
        atomic_write_text(run.sweep_json, json.dumps({"num": n, "k": e.k, "real_floor": floor, "results": results},
                                                     indent=1))
        sweep_plot(run.sweep_png, results, floor)
        fabric.print(f"sweep: {run.sweep_json}, {run.sweep_png} ({time.perf_counter() - t0:.0f} s)")
        return results

    return on_rank_zero(fabric, write)  # a failure there stops every rank with its message


def main(argv=None) -> int:
    parser = stage_parser(
        "sweep",
        "Sample at each sweep.temperatures and sweep.top_p value, score FID, precision and "
        "recall, and plot precision against recall (RUN/eval/sweep.png, sweep.json).",
        ("fabric", "sample", "evaluate", "sweep"),
        example="sweep.num=200 sweep.temperatures=[0.8,1.0]",
    )
    return run_main(lambda cfg, run, args: run_sweep(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
