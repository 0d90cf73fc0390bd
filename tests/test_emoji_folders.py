"""scripts/emoji_folders.py on a fake extracted package: no npm, no network."""

import importlib.util
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "emoji_folders.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("emoji_folders", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


emoji_folders = _load_script()


def _png(path: Path, colour: tuple[int, int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (4, 4), colour).save(path)
    return path.read_bytes()


def _entry(short_name: str, image: str, category: str, google: bool = True, skins: dict | None = None) -> dict:
    entry = {"short_name": short_name, "image": image, "category": category, "subcategory": "x",
             "sort_order": 1, "has_img_google": google}
    if skins is not None:
        entry["skin_variations"] = skins
    return entry


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """Smileys & Emotion: 2 images (+1 without a Google image); People & Body: 2 (+2 skin tones, one of them with a
    Google image); Component: 1, too few."""
    root = tmp_path / "package"
    img = root / "img" / "google" / "64"
    skins = {"1F3FB": {"image": "1f44b-1f3fb.png", "has_img_google": True},
             "1F3FC": {"image": "1f44b-1f3fc.png", "has_img_google": False}}
    entries = [_entry("grinning", "1f600.png", "Smileys & Emotion"),
               _entry("+1", "1f44d.png", "Smileys & Emotion"),
               _entry("no_google", "1f601.png", "Smileys & Emotion", google=False),
               _entry("wave", "1f44b.png", "People & Body", skins=skins),
               _entry("man-boy", "1f468-200d-1f466.png", "People & Body"),
               _entry("skin-tone-2", "1f3fb.png", "Component")]
    for i, name in enumerate(["1f600.png", "1f44d.png", "1f44b.png", "1f468-200d-1f466.png", "1f3fb.png",
                              "1f44b-1f3fb.png"]):
        _png(img / name, (40 * i, 255 - 40 * i, 7, 128))
    (root / "emoji.json").write_text(json.dumps(entries))
    (root / "package.json").write_text(json.dumps({"name": "emoji-datasource-google", "version": "16.0.0"}))
    return root


def _run(out: Path, package: Path, *extra: str) -> int:
    return emoji_folders.main([str(out), "--package-dir", str(package), "--min-per-class", "2", *extra])


def _files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_folders_names_and_bytes(tmp_path, package, capsys):
    out = tmp_path / "out"
    assert _run(out, package) == 0
    assert _files(out) == {"smileys_emotion/grinning.png", "smileys_emotion/+1.png", "people_body/wave.png",
                           "people_body/man-boy.png", ".emoji_folders.json"}
    img = package / "img" / "google" / "64"
    assert (out / "people_body" / "wave.png").read_bytes() == (img / "1f44b.png").read_bytes()
    assert (out / "smileys_emotion" / "+1.png").read_bytes() == (img / "1f44d.png").read_bytes()
    with Image.open(out / "smileys_emotion" / "grinning.png") as im:
        assert im.mode == "RGBA"
    printed = capsys.readouterr().out
    assert "total" in printed and "Component (1)" in printed
    manifest = json.loads((out / ".emoji_folders.json").read_text())
    assert manifest["classes"] == {"people_body": 2, "smileys_emotion": 2}
    assert manifest["total"] == 4 and manifest["version"] == "16.0.0"
    assert manifest["skipped_categories"] == {"Component": 1}
    assert manifest["categories"] == {"People & Body": "people_body", "Smileys & Emotion": "smileys_emotion"}


def test_skip_threshold(tmp_path, package):
    out = tmp_path / "out"
    assert emoji_folders.main([str(out), "--package-dir", str(package), "--min-per-class", "1"]) == 0
    assert (out / "component" / "skin-tone-2.png").is_file()
    assert emoji_folders.main([str(out), "--package-dir", str(package), "--min-per-class", "3",
                               "--skin-tones"]) == 0
    manifest = json.loads((out / ".emoji_folders.json").read_text())
    assert manifest["classes"] == {"people_body": 3}
    assert manifest["skipped_categories"] == {"Component": 1, "Smileys & Emotion": 2}
    assert not (out / "component").exists() and not (out / "smileys_emotion").exists()  # our stale files went


def test_skin_tones_and_rerun(tmp_path, package, capsys):
    out = tmp_path / "out"
    mine = out / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("not ours")
    assert _run(out, package, "--skin-tones") == 0
    people = out / "people_body"
    assert sorted(p.name for p in people.iterdir()) == ["man-boy.png", "wave.png", "wave_1f3fb.png"]
    assert (people / "wave_1f3fb.png").read_bytes() == (package / "img/google/64/1f44b-1f3fb.png").read_bytes()
    mtime = (people / "wave.png").stat().st_mtime_ns
    capsys.readouterr()
    assert _run(out, package) == 0  # rerun without skin tones: unchanged files stay, the skin tone goes
    assert "0 written" in capsys.readouterr().out
    assert (people / "wave.png").stat().st_mtime_ns == mtime
    assert not (people / "wave_1f3fb.png").exists()
    assert mine.read_text() == "not ours"
    assert not [p for p in out.rglob("*.tmp")]


def test_missing_package_dir(tmp_path, capsys):
    code = emoji_folders.main([str(tmp_path / "out"), "--package-dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error:") and "emoji.json" in err and len(err.strip().splitlines()) == 1


def test_unwritable_out_dir(tmp_path, package, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert _run(blocker / "out", package) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_npm_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(emoji_folders.shutil, "which", lambda name: None)
    assert emoji_folders.main([str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: npm not found") and "--package-dir" in err


def test_cached_package_is_reused(tmp_path, package, monkeypatch):
    out = tmp_path / "out"
    cached = out / ".npm-package" / "emoji-datasource-google-16.0.0"
    cached.parent.mkdir(parents=True)
    package.rename(cached)
    monkeypatch.setattr(emoji_folders, "npm_pack", lambda *a: pytest.fail("npm used despite the cache"))
    assert emoji_folders.main([str(out), "--min-per-class", "2"]) == 0
    assert (out / "people_body" / "wave.png").is_file()


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_keeps_only_what_is_needed(tmp_path):
    tgz = _tarball(tmp_path / "p.tgz", {"package/emoji.json": b"[]", "package/img/google/64/a.png": b"png",
                                        "package/img/google/sheets/big.png": b"sheet"})
    emoji_folders.extract(tgz, tmp_path / "x")
    assert _files(tmp_path / "x") == {"emoji.json", "img/google/64/a.png"}


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil", "package/img/../../evil"])
def test_extract_rejects_unsafe_paths(tmp_path, name):
    tgz = _tarball(tmp_path / "p.tgz", {"package/emoji.json": b"[]", name: b"x"})
    with pytest.raises(emoji_folders.ScriptError, match="unsafe path"):
        emoji_folders.extract(tgz, tmp_path / "x")
    assert not (tmp_path / "evil.png").exists()


def _fake_npm(tmp_path: Path, monkeypatch, body: str) -> None:
    """Put an ``npm`` shell script first on PATH (no real npm, no network)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + body)
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_fetch_with_npm_then_reuse(tmp_path, package, monkeypatch):
    members = {f"package/{p.relative_to(package).as_posix()}": p.read_bytes() for p in package.rglob("*")
               if p.is_file()}
    tgz = _tarball(tmp_path / "emoji-datasource-google-16.0.0.tgz", members)
    _fake_npm(tmp_path, monkeypatch, f'cp "{tgz}" . && echo "$@" >> "{tmp_path}/calls"\n')
    out = tmp_path / "out"
    for _ in range(2):
        assert emoji_folders.main([str(out), "--min-per-class", "2"]) == 0
    assert (tmp_path / "calls").read_text().split("\n")[0].startswith("pack emoji-datasource-google@16.0.0")
    assert len((tmp_path / "calls").read_text().splitlines()) == 1  # the second run reused the extracted package
    assert sorted(p.name for p in (out / ".npm-package").iterdir()) == ["emoji-datasource-google-16.0.0"]
    assert (out / "people_body" / "wave.png").read_bytes() == (package / "img/google/64/1f44b.png").read_bytes()


def test_npm_failure_is_one_line(tmp_path, monkeypatch, capsys):
    _fake_npm(tmp_path, monkeypatch, 'echo "npm error code ETARGET" >&2\n'
              'echo "npm error notarget No matching version found for x@9." >&2\nexit 1\n')
    assert emoji_folders.main([str(tmp_path / "out"), "--version", "9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: npm pack emoji-datasource-google@9 failed (notarget No matching version")
    assert len(err.strip().splitlines()) == 1 and "--package-dir" in err
    assert not (tmp_path / "out").exists()


def test_duplicate_pixels_are_dropped_unless_kept(tmp_path, package, capsys):
    """An emoji drawn again under another name (here "hi" re-saves wave's pixels in another PNG encoding) is
    dropped: a random split would otherwise hold out an image that training also sees."""
    from PIL import Image

    entries = json.loads((package / "emoji.json").read_text())
    entries.append(_entry("hi", "hi.png", "People & Body"))
    (package / "emoji.json").write_text(json.dumps(entries))
    img_dir = package / "img" / "google" / "64"
    Image.open(img_dir / "1f44b.png").save(img_dir / "hi.png", optimize=True, compress_level=1)
    assert (img_dir / "hi.png").read_bytes() != (img_dir / "1f44b.png").read_bytes()
    assert _run(tmp_path / "out", package) == 0
    assert "people_body/hi.png" not in _files(tmp_path / "out") and "people_body/wave.png" in _files(tmp_path / "out")
    assert "dropped 1 duplicate(s) of earlier images (hi, ...)" in capsys.readouterr().out
    assert _run(tmp_path / "kept", package, "--keep-duplicates") == 0
    assert "people_body/hi.png" in _files(tmp_path / "kept")
