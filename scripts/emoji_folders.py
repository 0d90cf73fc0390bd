"""Build class folders of colour emoji images from the npm package ``emoji-datasource-google``.

Each emoji with a Google image becomes ``OUT_DIR/<category>/<short_name>.png``: the package's 64x64 PNG, copied
byte for byte (RGBA, grey+alpha or palette with transparency; the project's loader composites the alpha itself).
The category folder is a lowercase slug of the emoji's category ("Smileys & Emotion" -> ``smileys_emotion``);
categories with fewer than ``--min-per-class`` images (e.g. "Component", the five skin-tone swatches) are skipped,
so every class has enough images to train and evaluate on. Images whose pixels equal an earlier one's (the
package draws some emoji twice under other names) are dropped unless ``--keep-duplicates``. ``--skin-tones``
adds the skin-tone variations as ``<short_name>_<skin tone code points>.png``.

The package is fetched with npm (``npm pack``) into ``OUT_DIR/.npm-package/`` (hidden, so the folder loader
ignores it) and reused on later runs without network; ``--package-dir`` points at an already extracted package
instead. Reruns are safe: files are written atomically, unchanged ones are left alone, and images an earlier run
wrote that are no longer wanted (say, without ``--skin-tones`` now) are removed. A summary goes to stdout and to
``OUT_DIR/.emoji_folders.json``.

    python scripts/emoji_folders.py data/emoji
    python scripts/emoji_folders.py data/emoji --skin-tones
    python scripts/emoji_folders.py data/emoji --package-dir /tmp/package   # extracted tarball, no npm

Then train on it with ``data.source: folder`` and ``data.path: data/emoji`` in a config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PACKAGE = "emoji-datasource-google"
DEFAULT_VERSION = "16.0.0"
MIN_PER_CLASS = 20
IMAGE_DIR = "img/google/64"
CACHE_DIR = ".npm-package"
MANIFEST = ".emoji_folders.json"
NPM_TIMEOUT = 900  # seconds; the tarball is about 75 MB


class ScriptError(Exception):
    """A problem the user can fix; main prints it as one ``error:`` line."""


@dataclass(frozen=True)
class Emoji:
    """One image to write: its category, its file name in the class folder and its PNG in the package."""

    category: str
    name: str
    source: str


# ---------------------------------------------------------------------------------------------------- the package


def fetch_package(out_dir: Path, version: str) -> Path:
    """The extracted package (only ``package.json``, ``emoji.json`` and the 64 px images) under
    ``OUT_DIR/.npm-package/``: reused if there, else fetched with ``npm pack`` and extracted."""
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+\-]*", version):
        raise ScriptError(f"--version {version!r} is not a version; pass one such as {DEFAULT_VERSION}")
    cache = out_dir / CACHE_DIR
    root = cache / f"{PACKAGE}-{version}"
    if (root / "emoji.json").is_file():
        return root
    made = [d for d in (out_dir, cache) if not d.exists()]
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        tarball = npm_pack(f"{PACKAGE}@{version}", work)
        extract(tarball, work / "package")
        os.replace(work / "package", root)  # whole or not at all: a killed run leaves only a .fetch-* folder
    finally:
        shutil.rmtree(work, ignore_errors=True)
        remove_if_empty(reversed(made))  # a failed fetch leaves no empty OUT_DIR behind
    return root


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Remove each folder that is empty (innermost first), leaving any that are not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def npm_pack(spec: str, dest: Path) -> Path:
    """Download the tarball of ``spec`` into ``dest`` with npm, the package registry's own client."""
    npm = shutil.which("npm")
    if npm is None:
        raise ScriptError("npm not found; install Node.js with npm (e.g. apt-get install npm), or download and "
                          f"extract {spec} yourself and pass --package-dir")
    try:
        done = subprocess.run([npm, "pack", spec, "--loglevel=error"], cwd=dest, capture_output=True, text=True,
                              timeout=NPM_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ScriptError(f"npm pack {spec} took over {NPM_TIMEOUT} s; check the network or pass --package-dir"
                          ) from None
    except OSError as exc:
        raise ScriptError(f"cannot run {npm} ({exc}); reinstall Node.js with npm, or pass --package-dir") from None
    tarballs = sorted(dest.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        raise ScriptError(f"npm pack {spec} failed ({npm_reason(done.stderr)}); check the network, npm's registry "
                          "setting and the version, or pass --package-dir")
    return tarballs[0]


def npm_reason(stderr: str) -> str:
    """The telling line of npm's error output: the first that says more than a code or where the log is."""
    lines = [re.sub(r"^npm (error|ERR!) ", "", line).strip() for line in stderr.splitlines()]
    telling = [line for line in lines if len(line.split()) >= 4 and not line.startswith("A complete log")]
    return (telling or [line for line in lines if line] or ["no output"])[0]


def extract(tarball: Path, dest: Path) -> None:
    """Safely extract the members we need from an npm tarball (all under ``package/``) into ``dest``: any member
    with an absolute path or ``..`` rejects the whole tarball; only regular files are written."""
    wanted = ("package/package.json", "package/emoji.json", f"package/{IMAGE_DIR}/")
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", member.name):
                    raise ScriptError(f"{tarball.name} holds an unsafe path {member.name!r}; not extracting it")
                if member.isfile() and member.name.startswith(wanted):
                    copy_member(tar, member, dest / Path(*parts[1:]))
    except tarfile.TarError as exc:
        raise ScriptError(f"{tarball.name} is not a readable npm tarball ({exc}); delete it and retry") from None


def copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Write one regular file of the tarball to ``target``."""
    source = tar.extractfile(member)
    if source is None:
        raise ScriptError(f"cannot read {member.name} in the npm tarball; delete it and retry")
    target.parent.mkdir(parents=True, exist_ok=True)
    with source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)


def read_package(root: Path) -> tuple[list[dict], str | None]:
    """The entries of ``emoji.json`` in an extracted package root and the version named in its package.json."""
    data = root / "emoji.json"
    if not data.is_file() or not (root / IMAGE_DIR).is_dir():
        raise ScriptError(f"{root} is not an extracted {PACKAGE} package (it needs emoji.json and {IMAGE_DIR}/); "
                          "pass the folder holding them (npm tarballs put it under package/), or leave out "
                          "--package-dir to fetch it with npm")
    try:
        entries = json.loads(data.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ScriptError(f"{data} is not valid JSON ({exc}); re-extract the package") from None
    if not isinstance(entries, list):
        raise ScriptError(f"{data} is not a list of emoji; re-extract the package")
    return entries, package_version(root)


def package_version(root: Path) -> str | None:
    """The ``version`` of ``root/package.json``, or None if there is none."""
    try:
        return json.loads((root / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------- the images


def slug(text: str) -> str:
    """A lowercase folder name: runs of anything but letters and digits become one ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "other"


def safe_name(text: str) -> str:
    """A file name stem with no path separators or leading dot (emoji short names already are)."""
    return re.sub(r"[^A-Za-z0-9_+\-]", "_", text)


def select_images(entries: list[dict], skin_tones: bool) -> list[Emoji]:
    """Every entry with a Google image and, with ``skin_tones``, its skin-tone variations that have one."""
    images = []
    for entry in entries:
        try:
            images += entry_images(entry, skin_tones)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ScriptError(f"emoji.json has a malformed entry ({exc!r} in {str(entry)[:80]}); "
                              "re-extract the package") from None
    return images


def entry_images(entry: dict, skin_tones: bool) -> list[Emoji]:
    """The images of one emoji.json entry."""
    base = safe_name(entry["short_name"])
    images = [Emoji(entry["category"], base, entry["image"])] if entry.get("has_img_google") else []
    if skin_tones:
        for tones, variation in (entry.get("skin_variations") or {}).items():
            if variation.get("has_img_google"):
                images.append(Emoji(entry["category"], f"{base}_{safe_name(tones.lower())}", variation["image"]))
    return images


def drop_duplicates(images: list[Emoji], image_dir: Path) -> tuple[list[Emoji], list[str]]:
    """The images whose pixels no earlier image has, and the names of those dropped: the package draws some emoji
    twice under other names (``family`` and ``man-man-boy``, flags of territories that share a flag), which a
    random train/held-out split would put on both sides."""
    from PIL import Image

    seen: set[bytes] = set()
    kept, dropped = [], []
    for image in images:
        with Image.open(image_dir / image.source) as img:
            rgba = img.convert("RGBA")
            key = hashlib.sha256(rgba.tobytes() + repr(rgba.size).encode()).digest()
        if key in seen:
            dropped.append(image.name)
        else:
            seen.add(key)
            kept.append(image)
    return kept, dropped


def split_classes(images: list[Emoji], min_per_class: int) -> tuple[dict[str, list[Emoji]], dict[str, int]]:
    """Images by category, and the categories with fewer than ``min_per_class`` images (with their counts)."""
    by_category: dict[str, list[Emoji]] = {}
    for image in images:
        by_category.setdefault(image.category, []).append(image)
    kept = {c: imgs for c, imgs in by_category.items() if len(imgs) >= min_per_class}
    skipped = {c: len(imgs) for c, imgs in by_category.items() if len(imgs) < min_per_class}
    return kept, skipped


def slug_map(categories: list[str]) -> dict[str, str]:
    """Category -> folder name; two categories with one slug would merge classes, so that is an error."""
    slugs = {c: slug(c) for c in sorted(categories)}
    seen: dict[str, str] = {}
    for category, name in slugs.items():
        if name in seen:
            raise ScriptError(f"categories {seen[name]!r} and {category!r} both map to folder {name!r}")
        seen[name] = category
    return slugs


def plan(classes: dict[str, list[Emoji]], slugs: dict[str, str], image_dir: Path) -> dict[str, Path]:
    """Relative output path (``<slug>/<name>.png``) -> source PNG, checking names are unique and sources exist."""
    files: dict[str, Path] = {}
    for category, images in classes.items():
        for image in images:
            rel = f"{slugs[category]}/{image.name}.png"
            if rel in files:
                raise ScriptError(f"two emoji would both be written to {rel}; emoji.json has duplicate short names")
            source = image_dir / image.source
            if not source.is_file():
                raise ScriptError(f"{source} is missing though emoji.json says it has a Google image; "
                                  "re-extract the package")
            files[rel] = source
    return files


# ---------------------------------------------------------------------------------------------------- writing


def write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` via a hidden temporary file and os.replace; False if it already held them."""
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def write_files(out_dir: Path, files: dict[str, Path]) -> int:
    """Copy every planned PNG unchanged; the number actually (re)written."""
    return sum(write_atomic(out_dir / rel, source.read_bytes()) for rel, source in sorted(files.items()))


def previous_files(out_dir: Path) -> list[str]:
    """The files an earlier run listed in its manifest ([] if there is no readable one)."""
    try:
        files = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str)]


def remove_stale(out_dir: Path, old: list[str], new: dict[str, Path]) -> int:
    """Delete files an earlier run wrote that this run does not (and class folders that leaves empty, which the
    folder loader would refuse); only plain ``<folder>/<name>.png`` paths are touched."""
    removed = 0
    for rel in sorted(set(old) - set(new)):
        parts = PurePosixPath(rel).parts
        if len(parts) != 2 or ".." in parts or parts[0].startswith(".") or not rel.endswith(".png"):
            continue
        path = out_dir / rel
        if path.is_file():
            path.unlink()
            removed += 1
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()
    return removed


def write_manifest(out_dir: Path, summary: dict) -> None:
    """``OUT_DIR/.emoji_folders.json``: the summary plus the list of files written (for the next run's cleanup)."""
    write_atomic(out_dir / MANIFEST, (json.dumps(summary, indent=1) + "\n").encode())


# ---------------------------------------------------------------------------------------------------- main


def build(args: argparse.Namespace) -> dict:
    """Do the work; the summary written to the manifest."""
    out_dir = Path(args.out_dir)
    root = Path(args.package_dir) if args.package_dir else fetch_package(out_dir, args.version)
    entries, version = read_package(root)
    images, duplicates = select_images(entries, args.skin_tones), []
    if not args.keep_duplicates:
        images, duplicates = drop_duplicates(images, root / IMAGE_DIR)
    classes, skipped = split_classes(images, args.min_per_class)
    if not classes:
        raise ScriptError(f"no category has {args.min_per_class} or more images in {root / 'emoji.json'}; "
                          "lower --min-per-class")
    slugs = slug_map(list(classes))
    files = plan(classes, slugs, root / IMAGE_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = write_files(out_dir, files)
    removed = remove_stale(out_dir, previous_files(out_dir), files)
    counts = {slugs[c]: len(imgs) for c, imgs in sorted(classes.items(), key=lambda kv: slugs[kv[0]])}
    summary = {"package": PACKAGE, "version": version or args.version, "image_size": 64,
               "skin_tones": args.skin_tones, "min_per_class": args.min_per_class, "classes": counts,
               "total": len(files), "skipped_categories": dict(sorted(skipped.items())),
               "duplicates_dropped": duplicates, "categories": slugs, "written": written, "removed": removed,
               "files": sorted(files)}
    write_manifest(out_dir, summary)
    return summary


def print_summary(out_dir: str, summary: dict) -> None:
    """Images per class folder, the total, and what was skipped."""
    width = max(len(name) for name in summary["classes"])
    print(f"{PACKAGE} {summary['version']} -> {out_dir}" + (" (with skin tones)" if summary["skin_tones"] else ""))
    for name, count in summary["classes"].items():
        print(f"  {name:<{width}}  {count:5d}")
    print(f"  {'total':<{width}}  {summary['total']:5d}  in {len(summary['classes'])} classes "
          f"({summary['written']} written, {summary['total'] - summary['written']} unchanged"
          + (f", {summary['removed']} stale removed)" if summary["removed"] else ")"))
    if summary["skipped_categories"]:
        skipped = ", ".join(f"{c} ({n})" for c, n in summary["skipped_categories"].items())
        print(f"  skipped, fewer than {summary['min_per_class']} images: {skipped}")
    if summary["duplicates_dropped"]:
        print(f"  dropped {len(summary['duplicates_dropped'])} duplicate(s) of earlier images "
              f"({', '.join(summary['duplicates_dropped'][:4])}, ...)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write <category>/<short_name>.png into")
    parser.add_argument("--package-dir", metavar="DIR",
                        help=f"an extracted {PACKAGE} package (holding emoji.json and {IMAGE_DIR}/); "
                             f"default: fetch it with npm into OUT_DIR/{CACHE_DIR}/")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="package version to fetch (default %(default)s)")
    parser.add_argument("--skin-tones", action="store_true", help="also write the skin-tone variations")
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="keep emoji whose pixels equal an earlier one's (dropped by default)")
    parser.add_argument("--min-per-class", type=int, default=MIN_PER_CLASS, metavar="N",
                        help="skip categories with fewer images (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = build(args)
    except ScriptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check that OUT_DIR is a writable folder on a disk with free "
              "space and that the package files are readable", file=sys.stderr)
        return 1
    print_summary(args.out_dir, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
