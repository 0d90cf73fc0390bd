"""Stage 0: prepare the data once and show it before training: RUN/data/summary.json (images per split and class,
class names, the image modes found and what decoding did to each, skipped files with reasons, where the held-out
images come from) and RUN/data/preview.png (the first training images of each class as training sees them).
Stage 1 writes the same two files when this stage was not run. A folder that the stages stream (data.streaming) is
only listed, not decoded into the cache: its summary then has no image modes, as stage 1's.

    python -m stages.data --config configs/mnist.yaml [key=value ...]
"""

import json
import sys

import torch

from pipeline.config import Config
from pipeline.data import ImageData, augment, data_summary, to_float, to_uint8
from pipeline.distributed import ONE_PROCESS
from pipeline.images import class_rows, grid_image, labelled_grid
from pipeline.io import atomic_save_png, atomic_write_text
from stages.cli import run_main, stage_parser
from stages.runfolder import RunFolder, load_run_data

PREVIEW_PER_CLASS = 12
PREVIEW_UNLABELLED = 48


def preview_image(data: ImageData, cfg: Config):
    """The first training images of each class (rows by name), and below each row the same images augmented when
    data.hflip or data.crop_scale is on (drawn with a fixed seed)."""
    d = cfg.data
    augmented = d.hflip or d.crop_scale < 1
    n = PREVIEW_PER_CLASS if data.class_names else PREVIEW_UNLABELLED
    first = data.first_images
    pixels, labels = first.__getitems__(list(range(min(len(first), 40 * n))))
    if not data.class_names:
        shown = pixels[:n]
        if not augmented:
            return grid_image(shown, nrow=12, scale=2)
        rows = [("as prepared", shown), ("augmented", _augmented(shown, cfg))]
        return labelled_grid(rows, scale=2)
    rows = class_rows(pixels, labels, data.class_names, n)
    if augmented:
        rows = [r for name, p in rows
                for r in ((name, p), (f"{name} (augmented)", _augmented(torch.as_tensor(p), cfg)))]
    return labelled_grid(rows, scale=2)


def _augmented(pixels: torch.Tensor, cfg: Config) -> torch.Tensor:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return to_uint8(augment(to_float(pixels), cfg.data.hflip, cfg.data.crop_scale))


def write_data_report(data: ImageData, cfg: Config, run: RunFolder) -> dict:
    summary = data_summary(data, cfg.data)
    preview = preview_image(data, cfg)  # built before writing, so a failure leaves earlier files as they were
    atomic_write_text(run.data_summary, json.dumps(summary, indent=2) + "\n")
    atomic_save_png(run.data_preview, preview)
    return summary


def summary_text(summary: dict) -> str:
    imgs = summary["images"]
    lines = [f"data: {imgs['train']} train / {imgs['holdout']} held-out images ({summary['holdout_source']}), "
             f"{summary['image_size']}px x {summary['channels']}ch"]
    if summary["class_names"]:
        per = summary["per_class"]
        lines.append(f"  {len(summary['class_names'])} classes (train / held-out): " + ", ".join(
            f"{n} {(per['train'] or {}).get(n, '?')}/{per['holdout'][n]}" for n in summary["class_names"]))
    else:
        lines.append("  unlabelled")
    for mode, m in summary["modes"].items():
        lines.append(f"  mode {mode}: {m['images']} image(s), {m['conversion']}")
    if summary["exif_rotated"]:
        lines.append(f"  {summary['exif_rotated']} image(s) turned upright by their EXIF orientation")
    for s in summary["skipped"][:5]:
        lines.append(f"  skipped {s['file']}: {s['reason']}")
    if len(summary["skipped"]) > 5:
        lines.append(f"  ... and {len(summary['skipped']) - 5} more skipped (all in summary.json)")
    return "\n".join(lines)


def run_data(cfg: Config, run: RunFolder) -> dict:
    data = load_run_data(cfg.data, run, ONE_PROCESS, random_access=False)  # streamed data is read as stage 1 does
    summary = write_data_report(data, cfg, run)
    print(summary_text(summary))
    print(f"wrote {run.data_summary} and {run.data_preview}" + (" (images from the cache)"
                                                                if data.prepared["cached"] else ""))
    return summary


def main(argv=None) -> int:
    parser = stage_parser(
        "data",
        "Prepare the data (cached in RUN/data/cache/ for the later stages; a streamed folder is only listed) and "
        "write RUN/data/summary.json and "
        "RUN/data/preview.png: images per split and class, image modes and their conversion, skipped files.",
        ("data",),
        example="data.source=folder data.path=~/pictures data.channels=3",
    )
    return run_main(lambda cfg, run, args: run_data(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
