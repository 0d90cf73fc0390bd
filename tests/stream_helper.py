"""Helper of tests/test_streaming.py (and bench/streaming.py): the stage-1 command, recording what it decodes.

    python -m tests.stream_helper LOG_DIR [STOP_AT] -- --config C --run DIR fabric.devices=2 data.streaming=always ...

Runs ``stages.stage1.main`` with the rest of the command line; Fabric's launcher starts the second process with the
same command, so both ranks record. Every image file decoded (``pipeline.streaming.load_image_file``) is appended to
``LOG_DIR/<who>-<pid>.txt``, ``who`` being ``setup`` before training starts, ``rank<r>-main`` in a rank's own
process during training (validation) and ``rank<r>-worker`` in its DataLoader workers. At its first training step
each rank writes ``LOG_DIR/rank<r>.json``: how many files had been decoded by then (its own, and rank 0's set-up)
and the seconds since the process started; after training, ``LOG_DIR/rank<r>-end.json``: its peak resident
memory (VmHWM, the rank's own process) and the seconds since it started. With STOP_AT >= 0 every rank sends
itself SIGINT (Ctrl-C) in step STOP_AT, as mp_resume_helper does: the run stops at the next step boundary,
checkpointed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

START = time.monotonic()


def png_folder(root: Path, n: int, classes: tuple[str, ...] = ("a", "b"), size: int = 16) -> Path:
    """``n`` distinct random grey PNGs dealt to class folders: a synthetic image folder, about 0.25 ms per file."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(buf, format="PNG")
        (root / classes[i % len(classes)] / f"{i:06d}.png").write_bytes(buf.getvalue())
    return root


def parquet_dataset(root: Path, n_train: int, shards: int, n_test: int, size: int = 16) -> Path:
    """A local copy of a Hub dataset, as the Hub lays one out: ``data/<split>-XXXXX-of-YYYYY.parquet`` with an
    ``image`` column (PNG bytes, each named ``<split>-<i>.png``) and a ``ClassLabel`` ``label`` (a, b): read by
    ``data.source=hub data.name=<root>``, streamed or not, with no network."""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    (root / "data").mkdir(parents=True)
    for split, n, parts in (("train", n_train, shards), ("test", n_test, 1)):
        for s in range(parts):
            ids = range(s * n // parts, (s + 1) * n // parts)
            images = []
            for i in ids:
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(buf, format="PNG")
                images.append({"bytes": buf.getvalue(), "path": f"{split}-{i}.png"})
            ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in ids]}, features=feats)
            ds.to_parquet(str(root / "data" / f"{split}-{s:05d}-of-{parts:05d}.parquet"))
    return root


def private_datasets_cache(env, home: Path) -> None:
    """Point ``datasets`` at ``home`` and offline, through ``env`` (a pytest MonkeyPatch): the environment for
    subprocesses, and ``datasets.config`` for this process, which read the environment when first imported (maybe by
    an earlier test module), so that nothing is written into ~/.cache/huggingface."""
    import datasets.config as dc

    cache = home / "datasets"
    env.setenv("HF_DATASETS_OFFLINE", "1")
    env.setenv("HF_HOME", str(home))
    env.setattr(dc, "HF_HUB_OFFLINE", True)
    env.setattr(dc, "HF_DATASETS_CACHE", cache)
    env.setattr(dc, "DOWNLOADED_DATASETS_PATH", cache / dc.DOWNLOADED_DATASETS_DIR)
    env.setattr(dc, "EXTRACTED_DATASETS_PATH", cache / dc.DOWNLOADED_DATASETS_DIR / dc.EXTRACTED_DATASETS_DIR)


def decoded(log: Path, prefix: str) -> int:
    return sum(len(p.read_text().splitlines()) for p in log.glob(f"{prefix}-*.txt"))


def main() -> int:
    split = sys.argv.index("--")
    log, stop_at, argv = Path(sys.argv[1]), int(sys.argv[2]) if split > 2 else -1, sys.argv[split + 1 :]
    log.mkdir(parents=True, exist_ok=True)

    import torch.utils.data

    import pipeline.streaming as streaming
    import stages.stage1 as stage1
    from bench.memory import vmhwm_bytes

    real_load, real_fit = streaming.load_image_file, stage1.fit
    who = {"tag": "setup"}

    def load_and_record(path, *args, **kwargs):
        worker = torch.utils.data.get_worker_info() is not None
        tag = who["tag"] + ("-worker" if worker else "-main") if who["tag"] != "setup" else "setup"
        with open(log / f"{tag}-{os.getpid()}.txt", "a") as fh:
            fh.write(f"{path.get('path') if isinstance(path, dict) else path}\n")  # a Hub example: its file name
        return real_load(path, *args, **kwargs)

    def fit_and_record(fabric, task, *args, **kwargs):
        rank = fabric.global_rank
        who["tag"] = f"rank{rank}"
        step_fn = task.training_step

        def training_step(fabric, model, batch, step):
            if not (log / f"rank{rank}.json").exists():
                (log / f"rank{rank}.json").write_text(json.dumps({
                    "own": decoded(log, f"rank{rank}"), "setup": decoded(log, "setup"),
                    "seconds": time.monotonic() - START, "step": step}))
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs in between
            return step_fn(fabric, model, batch, step)

        task.training_step = training_step
        metrics = real_fit(fabric, task, *args, **kwargs)
        (log / f"rank{rank}-end.json").write_text(json.dumps({"peak_rss_bytes": vmhwm_bytes(),
                                                              "seconds": time.monotonic() - START}))
        return metrics

    streaming.load_image_file, stage1.fit = load_and_record, fit_and_record
    return stage1.main(argv)


if __name__ == "__main__":
    sys.exit(main())
