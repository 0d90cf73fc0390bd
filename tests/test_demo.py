"""The demo page (``python -m pipeline.demo``) in a real headless browser: the server started as a user starts it,
offline, then Chromium driven through Selenium sets the controls, generates, uploads an image and reads back the
pictures the page shows, comparing them with the sampler's own output.

A screenshot of each tab goes to ``tmp_path``, or to ``$DEMO_SCREENSHOT`` (and ``<stem>_reconstruct.png`` beside
it) when set, e.g. ``DEMO_SCREENSHOT=docs/demo.png``; ``DEMO_SAMPLER=runs/fashion/sampler`` shows another sampler
than the smoke run's.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from pipeline.images import grid_image
from pipeline.sampler import Sampler
from tests.conftest import assert_same_draws

pytest.importorskip("gradio", reason="the demo needs gradio (pip install gradio)")
pytest.importorskip("selenium", reason="the browser test needs selenium (pip install selenium)")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from pipeline.demo import SINGLE_PX, TILE_PX, upscale  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT = 45  # seconds any one step may take on a loaded 2-core machine before the test gives up


@pytest.fixture(scope="module")
def sampler_dir(request) -> Path:
    if os.environ.get("DEMO_SAMPLER"):
        return Path(os.environ["DEMO_SAMPLER"])
    return request.getfixturevalue("smoke_run") / "sampler"


@pytest.fixture(scope="module")
def sampler(sampler_dir) -> Sampler:
    return Sampler.from_pretrained(sampler_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(sampler_dir, tmp_path_factory):
    """The demo served as a user starts it, on a free port; the URL once it answers HTTP."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(log.parent / "gradio")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.demo", "--sampler", str(sampler_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"the demo exited with {proc.returncode}: {log.read_text()}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the demo did not answer on {url}: {log.read_text()}"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Chromium and its driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below, selenium-manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the page 1280 x 900, whatever the window
                           {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


# ---------------------------------------------------------------------------------------------- page helpers
def wait_for(driver, condition, what: str):
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        pytest.fail(f"the page did not show {what} within {WAIT} s")


def type_into(driver, css: str, value) -> None:
    """Replace the text of an input (a number box, a slider's number box) and leave it, as a user does."""
    box = wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, css), css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def open_page(driver, server: str) -> None:
    driver.get(server)
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"), "the Generate button")


def pick_class(driver, name: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "#class input").click()
    xpath = f"//*[@id='class']//li[@role='option'][@aria-label='{name}']"
    wait_for(driver, lambda d: d.find_element(By.XPATH, xpath), f"the class {name!r} in the dropdown").click()
    wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#class input").get_attribute("value") == name,
             f"the class {name!r} chosen")


def shown_image(driver, elem_id: str, previous: str | None = None) -> tuple[str, Image.Image]:
    """The picture the image component ``elem_id`` shows (once it differs from ``previous``), fetched as the
    browser fetched it."""
    def src(d):
        found = [e.get_attribute("src") for e in d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")]
        return found[0] if found and found[0] and found[0] != previous else None

    url = wait_for(driver, src, f"a new picture in #{elem_id}")
    with urllib.request.urlopen(url, timeout=10) as response:
        return url, Image.open(io.BytesIO(response.read())).copy()


def tiles(picture: Image.Image, n: int, size: int, scale: int, pad: int = 2) -> np.ndarray:
    """The ``n`` images of a grid as ``grid_image`` lays them out (sqrt(n) per row), back at their own size."""
    arr = np.asarray(picture)[::scale, ::scale]  # nearest-neighbour upscaling undone
    arr = arr[..., None] if arr.ndim == 2 else arr
    nrow = int(np.ceil(np.sqrt(n)))
    out = []
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (size + pad), pad + c * (size + pad)
        out.append(arr[top : top + size, left : left + size])
    return np.stack(out)


def assert_images_match(got: np.ndarray, expected: np.ndarray, max_diverged: int = 1) -> None:
    """Images of another process: equal within 1 per pixel, but for ``max_diverged`` images whose codes may have
    flipped by rounding (see ``assert_same_draws``)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    off = np.abs(got.astype(np.int16) - expected).reshape(len(got), -1).max(1) > 1
    assert off.sum() <= max_diverged, f"{int(off.sum())} of {len(off)} images differ"


def error_message(driver) -> str:
    toast = wait_for(driver, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
                                        if e.text.strip()], "an error message")
    return toast[0].text


def screenshot_path(tmp_path: Path, suffix: str = "") -> Path:
    base = Path(os.environ.get("DEMO_SCREENSHOT") or tmp_path / "demo.png")
    return base.with_name(base.stem + suffix + base.suffix)


def download(driver, elem_id: str, suffix: str, previous: str | None = None) -> tuple[str, bytes]:
    """The file the page offers for download in ``elem_id`` whose name ends with ``suffix`` (once it is another
    than ``previous``): its URL and bytes."""
    def link(d):
        found = [a.get_attribute("href") for a in d.find_elements(By.CSS_SELECTOR, f"#{elem_id} a[download]")]
        return next((h for h in found if h and urlparse(h).path.endswith(suffix) and h != previous), None)

    url = wait_for(driver, link, f"a new {suffix} to download in #{elem_id}")
    with urllib.request.urlopen(url, timeout=10) as response:
        return url, response.read()


def saved_samples(driver, previous: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    url, data = download(driver, "samples_files", ".npz", previous)
    with np.load(io.BytesIO(data)) as saved:
        return url, {k: saved[k] for k in saved.files}


# ---------------------------------------------------------------------------------------------- tests
def test_page_loads_only_from_the_local_server(server, browser):
    open_page(browser, server)
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(urlparse(u).netloc == urlparse(server).netloc for u in loaded if u.startswith("http")), [
        u for u in loaded if urlparse(u).netloc != urlparse(server).netloc]


def test_generate_tab(server, browser, sampler, tmp_path):
    open_page(browser, server)
    names = sampler.class_names or [str(i) for i in range(sampler.num_classes)]
    assert names, "the demo's test sampler is expected to be class-conditional"
    index, count, seed, guidance = min(3, len(names) - 1), 12, 1, 5.0
    pick_class(browser, names[index])
    type_into(browser, "#count input[type=number]", count)
    type_into(browser, "#seed input", seed)
    type_into(browser, "#guidance input[type=number]", guidance)
    browser.find_element(By.ID, "generate").click()
    url, picture = shown_image(browser, "samples")
    npz_url, got = saved_samples(browser)

    d, size = sampler.sampling_defaults, sampler.image_size
    settings = dict(temperature=d.get("temperature", 1.0), top_k=d.get("top_k", 0), top_p=d.get("top_p", 1.0),
                    guidance=guidance)
    expected = sampler.generate_samples(count, labels=index, seed=seed, **settings)
    assert (got["labels"] == index).all()  # the class picked by name reached the sampler
    assert_same_draws([got[f"codes_{n}"] for n in sampler.level_names], expected.codes)  # and the seed, guidance
    scale = upscale(size, TILE_PX)
    assert picture.size == grid_image(expected.images, scale=scale).size  # 4 x 3 images for 12
    assert_images_match(tiles(picture, count, size, scale), expected.images)
    assert np.array_equal(got["images"], tiles(picture, count, size, scale))  # the grid shows the .npz's images
    assert Image.open(io.BytesIO(download(browser, "samples_files", ".png")[1])).size == picture.size
    browser.save_screenshot(screenshot_path(tmp_path))

    type_into(browser, "#seed input", seed + 1)
    browser.find_element(By.ID, "generate").click()
    _, other = shown_image(browser, "samples", previous=url)
    _, got_again = saved_samples(browser, previous=npz_url)
    again = sampler.generate_samples(count, labels=index, seed=seed + 1, **settings)
    assert other.size == picture.size
    assert_same_draws([got_again[f"codes_{n}"] for n in sampler.level_names], again.codes)
    assert_images_match(tiles(other, count, size, scale), again.images)
    last = f"codes_{sampler.level_names[-1]}"
    assert not np.array_equal(got_again[last], got[last])  # another seed, other images


def test_bad_settings_are_a_message_in_the_page(server, browser):
    open_page(browser, server)
    type_into(browser, "#top_p input[type=number]", 0)  # top-p must be in (0, 1]
    browser.find_element(By.ID, "generate").click()
    message = error_message(browser)
    assert "top_p=0" in message and "Traceback" not in message


def rgba_file(path: Path, pixels: np.ndarray) -> Path:
    """uint8 (H, W, C) pixels written as an RGBA PNG of twice their size, in a transparent frame that stores
    green (what the frame shows is the decoder's business: the page must show what ``load_images`` gives)."""
    rgb = np.broadcast_to(pixels, (*pixels.shape[:2], 3)).repeat(2, 0).repeat(2, 1)
    rgba = np.zeros((rgb.shape[0] + 4, rgb.shape[1] + 4, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[2:-2, 2:-2] = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def open_reconstruct_tab(driver, server: str) -> None:
    open_page(driver, server)
    tab = wait_for(driver, lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                                      if b.text.strip() == "Reconstruct"], "the Reconstruct tab")
    tab[0].click()


def test_reconstruct_tab(server, browser, sampler, tmp_path):
    path = rgba_file(tmp_path / "sample.png", sampler.generate(1, seed=7)[0])  # another size and mode
    open_reconstruct_tab(browser, server)
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload")
    upload.send_keys(str(path))
    _, recon = shown_image(browser, "recon")
    _, seen = shown_image(browser, "seen")
    _, codes_picture = shown_image(browser, "codes")

    images = sampler.load_images([path])  # decoded as training decoded its images
    codes = sampler.encode(images)
    scale = upscale(sampler.image_size, SINGLE_PX)
    as_seen = np.asarray(seen)[::scale, ::scale].reshape(images.shape)
    assert np.array_equal(as_seen, images)  # the same decoding: exact
    assert_images_match(np.asarray(recon)[::scale, ::scale].reshape(images.shape), sampler.decode(codes), 0)
    assert codes_picture.width >= SINGLE_PX * len(codes) and codes_picture.height >= SINGLE_PX

    with np.load(io.BytesIO(download(browser, "codes_file", ".npz")[1])) as saved:
        got = [saved[f"codes_{n}"] for n in sampler.level_names]
    assert_same_draws(got, codes, max_diverged=0)  # one image: nearest codes agree unless a distance ties
    browser.save_screenshot(screenshot_path(tmp_path, "_reconstruct"))


def test_a_file_that_is_no_image_is_a_message_in_the_page(server, browser, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    open_reconstruct_tab(browser, server)
    wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload").send_keys(
        str(bad))
    message = error_message(browser)
    assert "cannot read image" in message and "Traceback" not in message


def test_command_line_errors_are_one_line(sampler_dir, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {"in use": ["--sampler", str(sampler_dir), "--port", str(port)],
                 "no sampler": ["--sampler", str(tmp_path / "missing"), "--port", str(free_port())]}
        for what, args in cases.items():
            done = subprocess.run([sys.executable, "-m", "pipeline.demo", *args], capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 2, (what, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (what, done.stderr)
            assert (f":{port} " if what == "in use" else "config.json") in lines[0], lines[0]


def test_unconditional_sampler_offers_no_class(sampler, monkeypatch, tmp_path):
    from pipeline.demo import build_demo, generate

    monkeypatch.setattr(Sampler, "num_classes", property(lambda self: 0))  # as a prior trained without labels
    demo = build_demo(sampler)
    shown = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert shown["class"].visible is False and shown["guidance"].visible is False
    grid, files, status = generate(sampler, tmp_path, None, 4, 0, 1.0, 0, 1.0, 1.0)
    with np.load(files[1]) as saved:
        assert (saved["labels"] == -1).all() and len(saved["images"]) == 4
    assert grid.size == Image.open(files[0]).size and "class" not in status
