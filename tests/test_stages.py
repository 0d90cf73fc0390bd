"""End-to-end runs of every stage on the smoke config into a temporary folder (tiny, CPU, seconds)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.training import warmup_cosine
from stages import evaluate, sample, stage1, stage2
from tests.conftest import copy_run, run


def metric_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("logs/version_*/metrics.csv")):
        with open(path) as fh:
            rows += list(csv.DictReader(fh))
    return rows


def series(rows, key):
    return [float(r[key]) for r in rows if r.get(key)]


def test_stage1_writes_files_and_learns(smoke_run):
    s1 = smoke_run / "stage1"
    for name in ("last.ckpt", "best.ckpt", "reconstructions.png"):
        assert (s1 / name).is_file(), name
    assert (smoke_run / "config.yaml").is_file()
    losses = series(metric_rows(s1), "train/loss")
    assert len(losses) >= 3 and losses[-1] < losses[0]
    ckpt = torch.load(s1 / "last.ckpt", weights_only=True)
    assert ckpt["step"] == 20 and ckpt["meta"]["config"]["vqvae"]["codebook_size"] == 32
    assert {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)


def test_stage1_finished_run_is_not_retrained_and_resume_continues(smoke_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run, run_dir)
    assert run(stage1, run_dir) == 0
    assert "already finished (20/20 steps)" in capsys.readouterr().out
    assert run(stage1, run_dir, "stage1.max_steps=30") == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "at step 20" in out
    assert torch.load(run_dir / "stage1" / "last.ckpt", weights_only=True)["step"] == 30


def test_resume_applies_changed_optimizer_settings_and_says_so(smoke_run, tmp_path, capsys):
    """A resume with another lr or weight decay runs with them (as config.yaml records), and says what changed."""
    run_dir = copy_run(smoke_run, tmp_path / "copy", parts=("config.yaml", "stage1"))
    assert run(stage1, run_dir, "stage1.max_steps=30", "stage1.lr=5e-4", "stage1.weight_decay=0.05") == 0
    out = capsys.readouterr().out
    assert ("at step 20 with changed settings (max_steps 20 -> 30; lr 0.001 -> 0.0005; weight_decay 0.0 -> 0.05), "
            "applied from this step on") in out
    ckpt = torch.load(run_dir / "stage1" / "last.ckpt", weights_only=True)
    decayed, plain = ckpt["optimizer"]["param_groups"]
    assert decayed["lr"] == pytest.approx(5e-4 * warmup_cosine(30, 5, 30, 0.1), rel=1e-9)  # 5e-5, not 1e-4
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert ckpt["train"]["lr"] == 5e-4
    assert ckpt["meta"]["config"]["stage1"]["lr"] == 5e-4 and ckpt["meta"]["config"]["stage1"]["max_steps"] == 30
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["stage1"]["lr"] == 5e-4


def test_grid_images_zero_writes_no_grid(smoke_run, tmp_path, capsys):
    run_dir = copy_run(smoke_run, tmp_path / "copy", parts=("config.yaml", "stage1", "codes", "stage2"))
    assert run(sample, run_dir, "sample.grid_images=0", "sample.num=4") == 0
    assert (run_dir / "samples" / "samples.npz").is_file() and not (run_dir / "samples" / "grid.png").exists()
    assert "grid.png" not in capsys.readouterr().out
    new = tmp_path / "new"
    assert run(stage1, new, "stage1.grid_images=0", "stage1.max_steps=2") == 0
    assert (new / "stage1" / "best.ckpt").is_file() and not (new / "stage1" / "reconstructions.png").exists()


def test_stage1_refuses_checkpoint_of_another_config(smoke_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(smoke_run / "stage1", run_dir / "stage1")
    assert run(stage1, run_dir, "vqvae.codebook_size=64") == 2
    err = capsys.readouterr().err
    assert "different config" in err and "vqvae.codebook_size: 32 -> 64" in err and "Traceback" not in err


def test_stage2_codes_and_priors(smoke_run):
    manifest = json.loads((smoke_run / "codes" / "manifest.json").read_text())
    assert manifest["levels"] == ["top", "bottom"] and manifest["grids"] == [[2, 2], [4, 4]]
    for level in ("top", "bottom"):
        folder = smoke_run / "stage2" / level
        assert (folder / "last.ckpt").is_file() and (folder / "best.ckpt").is_file()
    rows = metric_rows(smoke_run / "stage2")
    for level in ("top", "bottom"):
        losses = series(rows, f"{level}/train/loss")
        assert len(losses) >= 3 and losses[-1] < losses[0]
        assert series(rows, f"{level}/val/nll_bits")
    summary = json.loads((smoke_run / "stage2" / "summary.json").read_text())
    assert set(summary["levels"]) == {"top", "bottom"}
    assert all(np.isfinite(m["nll_bits"]) for m in summary["levels"].values())


def test_stage2_before_stage1_fails_with_one_line(tmp_path, capsys):
    assert run(stage2, tmp_path / "empty") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no stage-1 checkpoint") and "make stage1" in err and "\n" not in err


def test_sample_and_evaluate_before_their_stages(tmp_path, smoke_run, capsys):
    import shutil

    assert run(sample, tmp_path / "empty") == 2
    assert "no stage-1 checkpoint" in capsys.readouterr().err
    partial = tmp_path / "partial"
    shutil.copytree(smoke_run / "stage1", partial / "stage1")
    assert run(evaluate, partial) == 2
    assert "no samples" in capsys.readouterr().err


def test_sample_outputs(smoke_run):
    with np.load(smoke_run / "samples" / "samples.npz") as z:
        images, top, bottom, labels = z["images"], z["codes_top"], z["codes_bottom"], z["labels"]
        settings = json.loads(str(z["settings"]))
    assert images.shape == (40, 16, 16, 1) and images.dtype == np.uint8
    assert top.shape == (40, 2, 2) and bottom.shape == (40, 4, 4)
    assert labels.min() >= 0 and labels.max() < 10
    assert settings["temperature"] == 1.0
    assert (smoke_run / "samples" / "grid.png").is_file()
    assert {p.name for p in (smoke_run / "sampler").iterdir()} == {"config.json", "model.safetensors", "README.md",
                                                              "samples.png"}


def test_evaluate_report(smoke_run):
    assert run(evaluate, smoke_run) == 0
    report = json.loads((smoke_run / "eval" / "report.json").read_text())
    for key in ("fid", "inception_score", "precision", "recall", "density", "coverage", "num_samples",
                "feature_extractor", "real_floor", "recon", "codebook", "prior_nll_bits", "sampling"):
        assert key in report, key
    assert report["feature_extractor"] == "domain"
    assert set(report["recon"]) == {"mse", "psnr", "rfid"}
    assert set(report["prior_nll_bits"]) >= {"top", "bottom"}
    assert 0 <= report["precision"] <= 1 and report["real_floor"]["fid"] >= 0
    for side in (report, report["real_floor"]):
        assert side["kid"]["std"] >= 0 and set(side["interval"]) == {"fid", "precision", "recall"}
        lo, hi = side["interval"]["fid"]
        assert lo <= hi and lo <= side["fid"] * 1.5  # the bootstrap's spread sits around the estimate
    per = report["per_class"]
    assert [r["class"] for r in per["classes"]] == [str(i) for i in range(10)]
    assert sum(r["samples"] for r in per["classes"]) == report["num_samples"]
    assert 0 <= per["asked_class_accuracy"] <= 1 and 0 <= per["real_accuracy"] <= 1
    judged = report["per_class_independent"]  # the SVM on pixels, floor on held-out images only
    assert sum(r["samples"] for r in judged["classes"]) == report["num_samples"]
    assert 0 <= judged["asked_class_accuracy"] <= 1 and 0 <= judged["real_accuracy"] <= 1
    assert judged["fitted_on"] > 0 and "support-vector machine" in judged["judge"]
    md = (smoke_run / "eval" / "report.md").read_text()
    assert "| kid |" in md and "## Per class" in md and "95% bootstrap intervals" in md
    assert "By an independent judge" in md
    for name in ("report.md", "reconstructions.png", "codebook_usage.png", "classifier.ckpt"):
        assert (smoke_run / "eval" / name).is_file()


def test_sweep_plots_precision_against_recall(smoke_run):
    from stages import sweep

    assert run(sweep, smoke_run) == 0
    data = json.loads((smoke_run / "eval" / "sweep.json").read_text())
    settings = [(r["vary"], r["temperature"], r["top_p"], r.get("guidance"), r.get("accept")) for r in data["results"]]
    assert settings == [("temperature", 0.8, 1.0, None, None), ("temperature", 1.0, 1.0, None, None),
                        ("top_p", 1.0, 0.9, None, None), ("guidance", 1.0, 1.0, 1.0, None),
                        ("guidance", 1.0, 1.0, 3.0, None), ("accept", 1.0, 1.0, None, 0.5),
                        ("accept", 1.0, 1.0, None, 0.25)]  # the smoke config's + the default guidance and accept
    assert [r["sampled_per_kept"] for r in data["results"]] == [1, 1, 1, 1, 1, 2, 4]
    for r in data["results"]:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["fid"] >= 0
        assert 0 <= r["asked_class_accuracy"] <= 1  # the smoke prior is class-conditional
    assert set(data["real_floor"]) >= {"fid", "precision", "recall", "asked_class_accuracy"}
    assert (smoke_run / "eval" / "sweep.png").stat().st_size > 1000


def test_bf16_true_trains_stage1_and_stage2_with_fp32_codebooks(smoke_run, tmp_path):
    """fabric.precision=bf16-true casts the whole model to bf16 and makes bf16 the default dtype in forward;
    the quantizer keeps its codebook statistics in float32 and hands back bf16 vectors."""
    run_dir = tmp_path / "run"
    assert run(stage1, run_dir, "fabric.precision=bf16-true", "stage1.max_steps=5", "stage1.eval_every=5") == 0
    ckpt = torch.load(run_dir / "stage1" / "last.ckpt", weights_only=True)
    assert np.isfinite(ckpt["metrics"]["mse"])
    model = ckpt["model"]
    assert model["decoder.0.weight"].dtype == torch.bfloat16
    for name in [k for k in model if k.endswith(("codebook", "ema_sum", "ema_count"))]:
        assert model[name].dtype == torch.float32, name
    assert run(stage2, run_dir, "fabric.precision=bf16-true", "stage2.max_steps=5", "stage2.eval_every=5") == 0
    assert np.isfinite(torch.load(run_dir / "stage2" / "top" / "last.ckpt", weights_only=True)["metrics"]["nll_bits"])


def test_pixelcnn_priors_by_override_and_old_specs_resume(smoke_run, tmp_path, capsys):
    """prior.*.kind=pixelcnn on the GPT smoke preset trains PixelCNN priors with their defaults and own keys; a
    checkpoint whose spec has every field of both kinds (as written before per-kind configs) still resumes."""
    run_dir = copy_run(smoke_run, tmp_path / "copy", parts=("config.yaml", "stage1", "codes"))
    pix = ["prior.top.kind=pixelcnn", "prior.bottom.kind=pixelcnn", "prior.top.layers=2", "prior.bottom.layers=2",
           "prior.top.channels=8", "prior.bottom.channels=8", "prior.bottom.cond_channels=8"]
    assert run(stage2, run_dir, *pix, "stage2.max_steps=2") == 0
    last = run_dir / "stage2" / "bottom" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["meta"]["prior"]["net"] == {"kind": "pixelcnn", "channels": 8, "layers": 2, "kernel_size": 5,
                                            "cond_channels": 8, "cond_res_blocks": 2, "dropout": 0.0}
    ckpt["meta"]["prior"]["net"].update(arch="gpt2", n_layer=4, n_embd=128, n_head=4)  # the old, full spec
    torch.save(ckpt, last)
    capsys.readouterr()
    assert run(stage2, run_dir, *pix, "stage2.max_steps=4") == 0
    assert "stage 2 bottom: resuming from" in capsys.readouterr().out
    assert run(sample, run_dir, "sample.num=4") == 0
    config = json.loads((run_dir / "sampler" / "config.json").read_text())
    assert [p["net"]["kind"] for p in config["priors"]] == ["pixelcnn", "pixelcnn"]
    assert "n_layer" not in config["priors"][1]["net"]  # no dead fields in the export


def test_run_folders_of_the_previous_layout_still_load(smoke_run, tmp_path):
    """A stage-1 checkpoint whose config has the keys of before (stage2.extract_batch_size, evaluate.sweep_*, both
    prior kinds' fields in one section) loads: stage 2 trains on it and sampling works."""
    run_dir = copy_run(smoke_run, tmp_path / "old", parts=("config.yaml", "stage1"))
    for name in ("last.ckpt", "best.ckpt"):
        path = run_dir / "stage1" / name
        ckpt = torch.load(path, weights_only=True)
        c = ckpt["meta"]["config"]
        extract, sweep = c.pop("extract"), c.pop("sweep")
        c["stage2"].update(extract_batch_size=extract["batch_size"], shard_size=extract["shard_size"])
        c["evaluate"].update(sweep_temperatures=sweep["temperatures"], sweep_top_p=sweep["top_p"],
                             sweep_num=sweep["num"])
        for level in ("top", "bottom"):
            c["prior"][level].update(channels=64, layers=8, kernel_size=5, cond_channels=64, cond_res_blocks=2)
        torch.save(ckpt, path)
    assert run(stage2, run_dir, "stage2.max_steps=2") == 0
    assert run(sample, run_dir, "sample.num=4") == 0


def test_class_names_travel_from_folders_to_the_exported_sampler(tmp_path, capsys):
    """Class folders name the classes; sample.labels, --label and Sampler.generate take the names; the export's
    config.json lists them. Unlabelled data with a class-conditional prior stops at the start of stage 1."""
    from pipeline.generate import main as generate
    from pipeline.sampler import Sampler
    from tests.conftest import image_folder

    images = image_folder(tmp_path / "images", n=12)
    (images / "a").rename(images / "cat")
    (images / "b").rename(images / "dog")
    run_dir, data = tmp_path / "run", ["data.source=folder", f"data.path={images}", "data.image_size=16"]
    short = ["stage1.max_steps=2", "stage1.batch_size=8", "stage2.max_steps=2", "stage2.batch_size=8"]
    assert run(stage1, run_dir, *data, *short) == 0
    assert "classes cat, dog" in capsys.readouterr().out
    assert run(stage2, run_dir, *short) == 0
    assert run(sample, run_dir, "sample.num=6", "sample.labels=dog,cat") == 0
    with np.load(run_dir / "samples" / "samples.npz") as z:
        assert z["labels"].tolist() == [1, 0, 1, 0, 1, 0]
    assert json.loads((run_dir / "sampler" / "config.json").read_text())["class_names"] == ["cat", "dog"]
    sampler = Sampler.from_pretrained(run_dir / "sampler")
    assert sampler.generate_samples(3, labels="cat").labels.tolist() == [0, 0, 0]
    capsys.readouterr()
    out = tmp_path / "x.png"
    assert generate(["--sampler", str(run_dir / "sampler"), "--num", "2", "--label", "dog", "--out", str(out)]) == 0
    assert generate(["--sampler", str(run_dir / "sampler"), "--num", "2", "--label", "cow", "--out", str(out)]) == 2
    assert "error: label 'cow' is not a class of this sampler; classes: cat, dog" in capsys.readouterr().err

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(images.rglob("*.png"))[:8]:
        p.rename(flat / f"{p.parent.name}-{p.name}")
    assert run(stage1, tmp_path / "run2", "data.source=folder", f"data.path={flat}", "data.image_size=16") == 2
    assert "prior.class_conditional=true but the data has no labels" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def mixed_mode_folder(root: Path) -> Path:
    """Class folders "circle" and "square" whose images are RGBA, LA, palette with transparency, 16-bit grey,
    CMYK JPEG and EXIF-rotated JPEG; every transparent pixel stores pure green (0, 255, 0) under its alpha."""
    from PIL import Image

    yy, xx = np.mgrid[:20, :20]
    shapes = {"circle": (yy - 10) ** 2 + (xx - 10) ** 2 < 36, "square": (abs(yy - 10) < 6) & (abs(xx - 10) < 6)}
    for name, inside in shapes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(3):
            rgba = np.zeros((20, 20, 4), np.uint8)
            rgba[..., 1] = 255  # green hidden under alpha 0
            rgba[inside] = (200, 40 * i, 40, 255)
            Image.fromarray(rgba, "RGBA").save(folder / f"rgba{i}.png")
            la = np.stack([np.where(inside, 30 * i, 180), np.where(inside, 255, 0)], -1).astype(np.uint8)
            Image.fromarray(la, "LA").save(folder / f"la{i}.png")
            pal = Image.fromarray(inside.astype(np.uint8) + 1, "L").convert("P")
            pal.putpalette([0, 255, 0, 20 * i, 0, 200, 255, 0, 0] + [0] * 759)  # 0 green (unused), 1 transparent
            pal.save(folder / f"pal{i}.png", transparency=1)
            Image.fromarray(np.where(inside, 50000 - 9000 * i, 1000).astype(np.uint16)).save(folder / f"deep{i}.png")
            Image.fromarray(np.where(inside[..., None], [0, 200, 100 + 40 * i, 0], 0).astype(np.uint8),
                            "CMYK").save(folder / f"cmyk{i}.jpg")
            rotated = Image.fromarray(np.where(inside[..., None], [20 * i, 90, 200], 255).astype(np.uint8), "RGB")
            exif = Image.Exif()
            exif[0x0112] = 6  # "rotate 90 clockwise to display"
            rotated.save(folder / f"exif{i}.jpg", exif=exif)
    return root


def test_a_folder_of_every_mode_trains_samples_by_name_and_exports_its_names(tmp_path, capsys):
    """Issue 14's acceptance: RGBA, LA, palette + transparency, 16-bit grey, CMYK and EXIF-rotated images in named
    class folders: `make data` reports each mode, the stages train, sample by class name and export a sampler
    whose config.json lists the names; no pixel anywhere shows the green stored under transparent pixels."""
    from pipeline.data import load_image_data
    from pipeline.sampler import Sampler
    from stages import data as data_stage

    images = mixed_mode_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    base = ["data.source=folder", f"data.path={images}", "data.image_size=16", "data.channels=3",
            "data.holdout_fraction=0.25"]
    assert run(data_stage, run_dir, *base) == 0
    summary = json.loads((run_dir / "data" / "summary.json").read_text())
    assert set(summary["modes"]) == {"RGBA", "LA", "P+transparency", "I;16", "CMYK", "RGB"}
    assert summary["modes"]["I;16"]["conversion"] == "16-bit scaled to 8 bits; grey -> RGB (lossless)"
    assert summary["exif_rotated"] == 6 and summary["class_names"] == ["circle", "square"]
    assert "mode CMYK: 6 image(s), CMYK -> RGB" in capsys.readouterr().out
    data = load_image_data(load_config_data(base), cache_dir=run_dir / "data" / "cache")
    assert data.prepared["cached"]
    pixels = torch.cat([data.train.all_pixels(), data.holdout.all_pixels()]).permute(0, 2, 3, 1).reshape(-1, 3)
    green = (pixels[:, 1] > 200) & (pixels[:, 0] < 60) & (pixels[:, 2] < 60)
    assert not bool(green.any()), f"{int(green.sum())} pixels show the colour stored under transparency"

    short = ["stage1.max_steps=4", "stage1.batch_size=8", "stage2.max_steps=4", "stage2.batch_size=8"]
    assert run(stage1, run_dir, *base, *short) == 0
    assert run(stage2, run_dir, *short) == 0
    assert run(sample, run_dir, "sample.num=6", "sample.labels=square") == 0
    with np.load(run_dir / "samples" / "samples.npz") as z:
        assert z["labels"].tolist() == [1] * 6 and z["images"].shape == (6, 16, 16, 3)
    assert json.loads((run_dir / "sampler" / "config.json").read_text())["class_names"] == ["circle", "square"]
    assert Sampler.from_pretrained(run_dir / "sampler").generate_samples(2, labels="circle").labels.tolist() == [0, 0]


def load_config_data(overrides):
    from pipeline.config import load_config

    return load_config("configs/smoke.yaml", overrides).data


def test_data_stage_on_the_default_preset_and_preview_rows_by_class(tmp_path, capsys):
    from PIL import Image

    from stages import data as data_stage

    assert run(data_stage, tmp_path / "run", "data.hflip=true") == 0
    out = capsys.readouterr().out
    assert "data: 540 train / 60 held-out images (a seeded 10% carve-out, data.split_seed=0), 16px x 1ch" in out
    summary = json.loads((tmp_path / "run" / "data" / "summary.json").read_text())
    assert summary["class_names"] == [str(i) for i in range(10)] and summary["augmentation"]["hflip"] is True
    assert sum(summary["images"].values()) == 600 and summary["modes"] == {
        "L": {"images": 5000, "conversion": "kept as is"}}
    preview = Image.open(tmp_path / "run" / "data" / "preview.png")
    assert preview.height > 20 * 16 * 2  # 10 classes x (prepared + augmented) rows of 16 px images at scale 2
    assert "wrote" in out and "(images from the cache)" not in out
    assert run(data_stage, tmp_path / "run", "data.hflip=true") == 0
    assert "(images from the cache)" in capsys.readouterr().out


def test_evaluation_beyond_the_held_out_set_and_its_reference_statistics_shared_by_runs(smoke_run, tmp_path, capsys):
    """evaluate.num_real above the 60 held-out images tops the real floor up with train images outside the
    reference; the real sets' statistics go to evaluate.reference_dir, where the evaluation of another run folder
    (same data, same classifier weights) reads them instead of running the extractor; a changed provenance
    (another feature count kept) recomputes."""
    import shutil

    ref = tmp_path / "reference"
    args = ["evaluate.num_real=80", f"evaluate.reference_dir={ref}", "evaluate.bootstrap=0"]
    first = copy_run(smoke_run, tmp_path / "first", parts=("config.yaml", "stage1", "codes", "stage2"))
    assert run(sample, first, "sample.num=80", "sample.grid_images=0") == 0
    assert run(evaluate, first, *args) == 0
    out = capsys.readouterr().out
    assert "read from" not in out
    report = json.loads((first / "eval" / "report.json").read_text())
    assert report["num_samples"] == 80 and report["real_floor_images"] == {"holdout": 60, "train": 20}
    assert sum(r["real"] for r in report["per_class"]["classes"]) == 80
    assert "80 real images (60 held-out, 20 train images outside the reference)" in (
        first / "eval" / "report.md").read_text()
    cached = sorted(p.name.split("-")[0] for p in ref.glob("*.npz"))
    assert cached == ["holdout", "holdout+train", "train"]  # rFID's 60 held-out, the floor, the reference
    assert [p.name.split("-")[0] for p in (first / "eval" / "reference").glob("*.npz")] == ["recon"]

    second = copy_run(first, tmp_path / "second", parts=("config.yaml", "stage1", "codes", "stage2", "samples"))
    (second / "eval").mkdir()
    shutil.copy2(first / "eval" / "classifier.ckpt", second / "eval")  # the same extractor weights
    stamps = {p: p.stat().st_mtime_ns for p in ref.glob("*.npz")}
    assert run(evaluate, second, *args) == 0
    out = capsys.readouterr().out
    for what in ("80 train images", "80 holdout+train images", "60 holdout images"):
        assert f"domain: statistics of {what} read from {ref}" in out, what
    assert {p: p.stat().st_mtime_ns for p in ref.glob("*.npz")} == stamps
    again = json.loads((second / "eval" / "report.json").read_text())
    for key in ("fid", "precision", "recall"):
        assert again[key] == pytest.approx(report[key], rel=1e-9) and again["real_floor"][key] == pytest.approx(
            report["real_floor"][key], rel=1e-9), key

    assert run(evaluate, second, *args, "evaluate.gather_features=50") == 0  # another provenance: recomputed
    assert "read from" not in capsys.readouterr().out and len(list(ref.glob("*.npz"))) == 6


def test_evaluation_size_names_the_largest_num_real_the_data_allows():
    from pipeline.config import EvaluateConfig
    from pipeline.io import UserError
    from stages.evaluate import evaluation_size

    assert evaluation_size(1000, 540, 60, EvaluateConfig()) == 60  # num_real=0: the held-out set's size
    assert evaluation_size(1000, 540, 60, EvaluateConfig(num_real=300)) == 300  # 300 reference + 60 + 240 floor
    assert evaluation_size(100, 540, 60, EvaluateConfig(num_real=300)) == 100  # no more than the samples
    with pytest.raises(UserError, match="evaluate.num_real=301: .* set evaluate.num_real to at most 300"):
        evaluation_size(1000, 540, 60, EvaluateConfig(num_real=301))


def test_encode_and_reconstruct_files_reproduce_the_stage1_reconstructions(smoke_run, tmp_path, capsys):
    """Held-out images written as files go through `python -m pipeline.generate encode / reconstruct` (the
    exported sampler, decoding as in training) to the codes and reconstructions of the stage-1 checkpoint."""
    from PIL import Image

    from pipeline.config import load_config
    from pipeline.data import load_image_data, to_float, to_uint8
    from pipeline.generate import main as generate
    from stages.runfolder import RunFolder, load_vqvae
    from tests.conftest import assert_same_draws, assert_same_images

    held = load_image_data(load_config("configs/smoke.yaml").data).holdout.all_pixels(6)  # (6, 1, 16, 16)
    files = []
    for i, img in enumerate(held.numpy()):
        files.append(tmp_path / f"held{i}.png")
        Image.fromarray(img[0], "L").convert("RGBA").save(files[-1])  # another mode than training's: same pixels
    vqvae, _, _ = load_vqvae(RunFolder(smoke_run))
    with torch.no_grad():
        codes = [c.numpy() for c in vqvae.encode(to_float(held))]
        recon = to_uint8(vqvae(to_float(held)).reconstruction).permute(0, 2, 3, 1).numpy()
    sampler = str(smoke_run / "sampler")
    assert generate(["encode", "--sampler", sampler, "--in", *map(str, files), "--out", str(tmp_path / "c.npz")]) == 0
    with np.load(tmp_path / "c.npz") as z:
        got = [z["codes_top"], z["codes_bottom"]]
        assert z["files"].tolist() == [str(f) for f in files]
    out = tmp_path / "recon.png"
    assert generate(["reconstruct", "--sampler", sampler, "--in", *map(str, files), "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * (16 * 2 + 4) + 4, 6 * (16 * 2 + 4) + 4)  # 2 rows of 6, scale 2, 2-px gaps x 2
    bottom = np.stack([grid[2 * 18 + 4 : 2 * 18 + 4 + 32 : 2, 4 + 36 * i : 4 + 36 * i + 32 : 2] for i in range(6)])
    assert_same_images(bottom[..., None], got[1], recon, codes[1])  # within rounding of the checkpoint's own
    assert_same_draws(got[0], codes[0])
    assert "reconstructed 6 image(s)" in capsys.readouterr().out

    missing = tmp_path / "nope.png"
    assert generate(["encode", "--sampler", sampler, "--in", str(files[0]), str(missing), "--out",
                     str(tmp_path / "d.npz")]) == 2
    (tmp_path / "text.png").write_text("not an image")
    assert generate(["reconstruct", "--sampler", sampler, "--in", str(tmp_path / "text.png"), "--out",
                     str(tmp_path / "e.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: cannot read image {missing}: no such file; give an image file PIL opens (PNG, JPEG, " \
                     "GIF, BMP, TIFF, WebP)"
    assert err[1].startswith(f"error: cannot read image {tmp_path / 'text.png'}: cannot identify image file")
    assert not (tmp_path / "d.npz").exists() and not (tmp_path / "e.png").exists()


def test_inception_headline_with_the_domain_column(smoke_run, tmp_path):
    """The default presets' evaluation: the standard Inception features are the headline, with the protocol named;
    the domain classifier's metrics sit beside them, and its labels give the per-class rows."""
    from pipeline.metrics.features import install_inception

    try:
        install_inception(Path(__file__).resolve().parents[1] / "weights")
    except RuntimeError as err:
        pytest.skip(f"Inception weights unavailable: {err}")
    run_dir = copy_run(smoke_run, tmp_path / "run")
    assert run(evaluate, run_dir, "evaluate.extractor=inception", "evaluate.num_real=20") == 0
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["feature_extractor"] == "inception" and report["num_samples"] == 20
    assert "clean-fid" in report["protocol"]["inception"] and set(report["feature_seconds"]) == {"inception", "domain"}
    domain = report["domain"]
    assert domain["fid"] != report["fid"] and domain["real_floor"]["fid"] != report["real_floor"]["fid"]
    assert domain["rfid"] != report["recon"]["rfid"] and 0 <= domain["classifier_heldout_accuracy"] <= 1
    assert isinstance(domain["inception_score"], dict) and isinstance(report["inception_score"], str)  # no head
    assert sum(r["samples"] for r in report["per_class"]["classes"]) == 20
    md = (run_dir / "eval" / "report.md").read_text()
    assert "| metric | samples (inception) | real floor (inception) | samples (domain) | real floor (domain) |" in md
    assert "`inception` features: Inception-v3 pool3" in md
    from pipeline.metrics.onnx_export import onnx_available

    speed = report["feature_speed"]["inception"]  # auto: onnxruntime on the CPU when installed
    assert speed["runtime"] == ("onnxruntime" if onnx_available() else "torch")
    assert speed["images"] == 80 and speed["images_per_s"] > 0  # reference, samples, floor, reconstructions
    assert f"{speed['images']} images through the network in {speed['seconds']} s" in md


def test_rejection_sampling_in_the_sample_stage(smoke_run, tmp_path, capsys):
    """sample.accept keeps the most typical num of num / accept candidates, class by class; sample.threshold keeps
    the first num candidates whose asked class reaches the threshold; both by the domain classifier of evaluate."""
    from pipeline.config import load_config
    from pipeline.data import load_image_data
    from pipeline.metrics.extract import make_extractor
    from pipeline.rejection import asked_class_probability, select_accepted
    from pipeline.sampler import Sampler
    from tests.conftest import SMOKE, assert_same_draws

    run_dir = copy_run(smoke_run, tmp_path / "run")
    assert run(sample, run_dir, "sample.accept=0.5") == 0
    assert "rejection: kept 40 of 80 samples (50%, accept 0.5), 2.00 sampled per kept image" in capsys.readouterr().out
    with np.load(run_dir / "samples" / "samples.npz") as z:
        kept = {k: z[k] for k in z.files}
    assert json.loads(str(kept["settings"]))["candidates"] == 80 and len(kept["images"]) == 40
    cfg = load_config(SMOKE)
    classifier, _ = make_extractor("domain", cfg.evaluate, run_dir / "eval" / "classifier.ckpt",
                                   load_image_data(cfg.data))
    exported = Sampler.from_pretrained(run_dir / "sampler")
    cand = exported.generate_samples(80, seed=cfg.sample.seed)  # the stream the stage drew its candidates from
    prob = asked_class_probability(classifier(torch.from_numpy(cand.images).permute(0, 3, 1, 2))[1].numpy(),
                                   cand.labels)
    chosen = select_accepted(prob, cand.labels, 40)
    assert_same_draws([kept["codes_top"], kept["codes_bottom"]], [c[chosen] for c in cand.codes])
    assert np.array_equal(np.bincount(kept["labels"], minlength=10),  # half of each asked class, up to rounding
                          np.bincount(cand.labels[chosen], minlength=10))

    assert run(sample, run_dir, "sample.threshold=0.2") == 0
    with np.load(run_dir / "samples" / "samples.npz") as z:
        images, labels = z["images"], z["labels"]
    got = asked_class_probability(classifier(torch.from_numpy(images).permute(0, 3, 1, 2))[1].numpy(), labels)
    assert len(images) == 40 and (got >= 0.2 - 1e-4).all()  # every kept sample passes (within float rounding)
    before = (run_dir / "samples" / "samples.npz").read_bytes()
    assert run(sample, run_dir, "sample.threshold=0.999") == 2  # too strict: nothing written
    assert "sample.threshold=0.999: fewer than 40 of 800 samples reach it" in capsys.readouterr().err
    assert (run_dir / "samples" / "samples.npz").read_bytes() == before
    assert run(sample, run_dir, "sample.accept=0.5", "sample.labels=none") == 2
    assert "need a class-conditional prior and labels" in capsys.readouterr().err
    assert run(evaluate, run_dir) == 0  # the report and the model card say how the scored samples were drawn
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["sampling"]["threshold"] == 0.2 and report["sampling"]["candidates"] >= 40
    card = (run_dir / "sampler" / "README.md").read_text()
    assert "threshold = 0.2" in card and "An independent judge" in card
