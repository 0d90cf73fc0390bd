"""A local web page for an exported sampler: generate images (class, temperature, top-k, top-p, guidance, seed,
count) and reconstruct your own image files through its VQ-VAE, with the code grid of each level as a picture.

    python -m pipeline.demo --sampler runs/mnist/sampler          # then open http://127.0.0.1:7860

It runs offline: no analytics, no share link, no fonts or scripts from the internet (Gradio serves its own).
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.generate import SAMPLER_HELP
from pipeline.images import grid_image
from pipeline.io import UserError, atomic_save_png, atomic_savez, debug_requested, os_error_message, report_errors

if TYPE_CHECKING:
    import gradio as gr

    from pipeline.sampler import Sampler, Samples

ANY_CLASS = "any (uniform)"  # the class choice that draws each image's class uniformly
DEFAULT_PORT = 7860
TILE_PX = 128  # a generated image is shown about this many pixels wide (nearest-neighbour upscaling)
SINGLE_PX = 256  # an uploaded image, its reconstruction and each code grid: about this many pixels wide
CAPTION_PX = 28  # the caption under a code grid, and the margin above it
MAX_COUNT = 64
CSS = ".pixelated img { image-rendering: pixelated; }"  # no blur when the browser scales a picture up


# ---------------------------------------------------------------------------------------------- pictures
def upscale(image_size: int, target_px: int) -> int:
    """The integer factor that shows ``image_size`` pixels at about ``target_px`` (at least 1)."""
    return max(1, math.ceil(target_px / image_size))


def code_colours(codebook_size: int) -> np.ndarray:
    """(K, 3) uint8: one colour per code, neighbouring indices far apart in hue (codes have no order)."""
    hues = (np.arange(codebook_size) * 0.618033988749895) % 1.0  # golden-ratio steps around the colour wheel
    rgb = [colorsys.hsv_to_rgb(h, 0.55 + 0.35 * (i % 3) / 2, 0.95 - 0.25 * (i % 2)) for i, h in enumerate(hues)]
    return (np.asarray(rgb) * 255).round().astype(np.uint8)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        return ImageFont.load_default()


def code_grid_picture(codes: np.ndarray, colours: np.ndarray, side: int, caption: str) -> Image.Image:
    """One level's (h, w) code grid as coloured cells ``side`` pixels wide, the index in each cell when it fits,
    ``caption`` below (a margin above: the page's label floats over the picture's top left corner)."""
    h, w = codes.shape
    cell = max(1, side // w)
    cells = Image.fromarray(colours[codes]).resize((w * cell, h * cell), Image.NEAREST)  # (h*cell, w*cell, 3)
    canvas = Image.new("RGB", (cells.width, cells.height + 2 * CAPTION_PX), "white")
    canvas.paste(cells, (0, CAPTION_PX))
    draw = ImageDraw.Draw(canvas)
    draw.text((cells.width / 2, cells.height + 1.5 * CAPTION_PX), caption, fill="black", font=font(14), anchor="mm")
    small = font(11)
    if draw.textlength(str(int(codes.max())), font=small) + 6 <= cell:  # room for the index in each cell
        for (r, c), code in np.ndenumerate(codes):
            light = colours[code].astype(float) @ (0.299, 0.587, 0.114) > 140
            centre = (c * cell + cell / 2, CAPTION_PX + r * cell + cell / 2)
            draw.text(centre, str(code), fill="black" if light else "white", font=small, anchor="mm")
    return canvas


def code_pictures(sampler: Sampler, codes: list[np.ndarray]) -> Image.Image:
    """The code grids of one image (per level, top first, each (h, w)) side by side, labelled with level name,
    shape and codebook size."""
    colours = code_colours(sampler.vqvae.cfg.codebook_size)
    k = sampler.vqvae.cfg.codebook_size
    parts = [code_grid_picture(c, colours, SINGLE_PX, f"{name}: {c.shape[0]}x{c.shape[1]} codes of {k}")
             for name, c in zip(sampler.level_names, codes)]
    canvas = Image.new("RGB", (sum(p.width for p in parts) + 16 * (len(parts) - 1), max(p.height for p in parts)),
                       "white")
    left = 0
    for part in parts:
        canvas.paste(part, (left, 0))
        left += part.width + 16
    return canvas


def single_image(sampler: Sampler, pixels: np.ndarray) -> Image.Image:
    """One uint8 (H, W, C) image, upscaled for the page."""
    return grid_image(pixels[None], nrow=1, pad=0, scale=upscale(sampler.image_size, SINGLE_PX))


# ---------------------------------------------------------------------------------------------- actions
def class_choices(sampler: Sampler) -> list[str]:
    """What the class dropdown offers: any class, then every class by name (empty when unconditional)."""
    if sampler.num_classes == 0:
        return []
    return [ANY_CLASS, *(sampler.class_names or [str(i) for i in range(sampler.num_classes)])]


def default_class(sampler: Sampler) -> str | None:
    """The dropdown's first value: the sampler's default labels when they name one class, else any class."""
    choices = class_choices(sampler)
    if not choices:
        return None
    label = str(sampler.sampling_defaults.get("labels", "uniform"))
    try:
        return choices[1 + sampler.class_index(label)]
    except UserError:  # "uniform", a list of classes, ...
        return ANY_CLASS


def generate(sampler: Sampler, outdir: Path, choice: str | None, count: float, seed: float, temperature: float,
             top_k: float, top_p: float, guidance: float) -> tuple[Image.Image, list[str], str]:
    """The Generate button: ``count`` images -> (their grid, [the grid's PNG, a samples .npz], status line)."""
    if count is None or not 1 <= count <= MAX_COUNT:
        raise UserError(f"count={count}: choose 1 to {MAX_COUNT} images")
    if seed is None or seed < 0 or seed != int(seed):
        raise UserError(f"seed={seed}: the seed is a whole number >= 0")
    choices = class_choices(sampler)
    if choices and choice not in choices:
        raise UserError(f"class {choice!r} is not a class of this sampler; pick one from the list")
    labels = None if not choices else "uniform" if choice == ANY_CLASS else choices.index(choice) - 1
    settings = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), labels=labels,
                    guidance=float(guidance), seed=int(seed))
    start = time.perf_counter()
    samples = sampler.generate_samples(int(count), **settings, batch_size=MAX_COUNT)
    seconds = time.perf_counter() - start
    grid = grid_image(samples.images, scale=upscale(sampler.image_size, TILE_PX))
    one_class = isinstance(labels, int)
    files = save_samples(samples, grid, settings, sampler.level_names, outdir,
                         f"samples_seed{int(seed)}" + (f"_{choice}" if one_class else ""))
    what = f"{int(count)} image(s)" + (f" of class {choice}" if one_class else "")
    drawn = "" if labels != "uniform" else "; classes " + ", ".join(choices[1 + i] for i in samples.labels[:12]) + (
        ", ..." if count > 12 else "")
    return grid, files, f"{what} in {seconds:.1f} s (seed {int(seed)}{drawn})"


def save_samples(samples: Samples, grid: Image.Image, settings: dict, level_names: list[str], outdir: Path,
                 stem: str) -> list[str]:
    """The grid as PNG and the samples as the sample stage writes them (images, labels, codes_<level>, settings),
    in a new folder under ``outdir``: the files to download."""
    folder = Path(tempfile.mkdtemp(dir=outdir))
    png = atomic_save_png(folder / f"{safe_name(stem)}.png", grid)
    npz = atomic_savez(folder / f"{safe_name(stem)}.npz", images=samples.images, labels=samples.labels,
                       settings=np.asarray(json.dumps(settings)),
                       **{f"codes_{n}": c for n, c in zip(level_names, samples.codes)})
    return [str(png), str(npz)]


def reconstruct(sampler: Sampler, outdir: Path, file: str | None) -> tuple:
    """An uploaded file -> (the image as the model sees it, its reconstruction, the code grids, codes .npz,
    status line); nothing when the upload was cleared."""
    if not file:
        return None, None, None, None, ""
    images = sampler.load_images([file])  # (1, H, W, C), decoded exactly as training decoded its images
    codes = sampler.encode(images)  # per level, top first: (1, h, w)
    recon = sampler.decode(codes)
    stem = safe_name(Path(file).stem) or "image"
    path = Path(tempfile.mkdtemp(dir=outdir)) / f"codes_{stem}.npz"
    atomic_savez(path, files=np.asarray([Path(file).name]),
                 **{f"codes_{n}": c for n, c in zip(sampler.level_names, codes)})  # as `pipeline.generate encode`
    mse = float(np.mean(((images.astype(np.float64) - recon) / 127.5) ** 2))
    psnr = 10 * math.log10(4 / mse) if mse > 0 else math.inf  # on [-1, 1]: peak-to-peak 2
    status = f"MSE {mse:.4g} on [-1, 1] (PSNR {psnr:.1f} dB)"
    return (single_image(sampler, images[0]), single_image(sampler, recon[0]),
            code_pictures(sampler, [c[0] for c in codes]), str(path), status)


def safe_name(text: str) -> str:
    """``text`` with only letters, digits, ``-``, ``_`` and ``.`` (a file name a browser keeps)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:80]


def shown_errors(fn: Callable) -> Callable:
    """A user's error (bad settings, a file that is no image, a full disk) as an error message in the page."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except OSError as err:
            raise gr.Error(os_error_message(err), print_exception=False) from None

    return wrapper


# ---------------------------------------------------------------------------------------------- page
def build_demo(sampler: Sampler, title: str = "pipeline demo") -> gr.Blocks:
    """The page: a Generate tab and a Reconstruct tab. Downloads are written under a temporary folder that lives
    as long as the returned Blocks."""
    import gradio as gr

    workdir = tempfile.TemporaryDirectory(prefix="pipeline-demo-")  # removed with the page or at exit
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## {title}\n{describe(sampler)}", elem_id="about")
        with gr.Tab("Generate"):
            generate_tab(sampler, Path(workdir.name))
        with gr.Tab("Reconstruct"):
            reconstruct_tab(sampler, Path(workdir.name))
    demo.workdir = workdir  # keeps the folder alive as long as the page
    return demo


def describe(sampler: Sampler) -> str:
    """One line about the sampler: image size, levels, codebook, classes."""
    c = sampler.vqvae.in_channels
    shapes = sampler.vqvae.grid_shapes(sampler.image_size)
    levels = ", ".join(f"{n} {h}x{w}" for n, (h, w) in zip(sampler.level_names, shapes))
    names = class_choices(sampler)[1:]
    classes = (f"{len(names)} classes ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})" if names
               else "unconditional")
    kind = {1: "grey", 3: "colour"}.get(c, f"{c}-channel")
    return (f"{sampler.image_size}x{sampler.image_size} {kind} images; code grids {levels} "
            f"(codebook {sampler.vqvae.cfg.codebook_size}); {classes}.")


def picture(label: str, elem_id: str, height: int) -> gr.Image:
    """An output picture, sent as PNG (exact pixels), not scaled smoothly, with download and full-screen buttons."""
    import gradio as gr

    return gr.Image(label=label, format="png", type="pil", height=height, interactive=False, elem_id=elem_id,
                    elem_classes="pixelated", buttons=["download", "fullscreen"])  # no "share" (to the HF Hub)


def generate_tab(sampler: Sampler, outdir: Path) -> None:
    import gradio as gr

    d = sampler.sampling_defaults
    conditional = sampler.num_classes > 0
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            choice = gr.Dropdown(class_choices(sampler), value=default_class(sampler), label="class",
                                 visible=conditional, elem_id="class")
            count = gr.Slider(1, MAX_COUNT, value=16, step=1, label="count", elem_id="count")
            seed = gr.Number(value=int(d.get("seed", 0)), precision=0, minimum=0, label="seed", elem_id="seed")
            temperature = gr.Slider(0.05, max(2.0, d.get("temperature", 1.0)), value=d.get("temperature", 1.0),
                                    step=0.05, label="temperature", elem_id="temperature")
            top_k = gr.Slider(0, sampler.vqvae.cfg.codebook_size, value=d.get("top_k", 0), step=1,
                              label="top-k (0 = off)", elem_id="top_k")
            top_p = gr.Slider(0.0, 1.0, value=d.get("top_p", 1.0), step=0.01, label="top-p (1 = off)",
                              elem_id="top_p")
            guidance = gr.Slider(0.0, max(8.0, d.get("guidance", 1.0)), value=d.get("guidance", 1.0), step=0.1,
                                 label="guidance (1 = off)", visible=conditional, elem_id="guidance")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            grid = picture("samples", "samples", height=460)
            status = gr.Markdown(elem_id="generate_status")
            files = gr.File(label="downloads: the grid (.png); images, labels, codes (.npz)", file_count="multiple",
                            interactive=False, elem_id="samples_files")
    action = shown_errors(functools.partial(generate, sampler, outdir))
    inputs = [choice, count, seed, temperature, top_k, top_p, guidance]
    button.click(action, inputs, [grid, files, status], api_name="generate")


def reconstruct_tab(sampler: Sampler, outdir: Path) -> None:
    import gradio as gr

    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            upload = gr.File(label="image file (PNG, JPEG, GIF, BMP, TIFF, WebP; any mode)", file_types=["image"],
                             type="filepath", elem_id="upload")
            gr.Markdown("The file is decoded exactly as training decoded its images (alpha over the training "
                        "background, orientation, size, channels), encoded to codes and decoded back.")
            status = gr.Markdown(elem_id="reconstruct_status")
            codes_file = gr.File(label="codes (.npz, as `pipeline.generate encode` writes)", interactive=False,
                                 elem_id="codes_file")
        with gr.Column(scale=2):
            with gr.Row():
                seen = picture("as the model sees it", "seen", height=300)
                recon = picture("reconstruction", "recon", height=300)
            codes = picture("code grids (one colour per code)", "codes", height=320)
    action = shown_errors(functools.partial(reconstruct, sampler, outdir))
    upload.change(action, upload, [seen, recon, codes, codes_file, status],
                  api_name="reconstruct")


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.demo",
        description="A local web page for an exported sampler folder (config.json + model.safetensors): generate "
        "images by class, temperature, top-k, top-p, guidance and seed, and reconstruct your own image files "
        "through its VQ-VAE with their code grids shown. Runs offline; stop it with Ctrl+C.",
        epilog="example: python -m pipeline.demo --sampler runs/mnist/sampler, then open http://127.0.0.1:7860")
    parser.add_argument("--sampler", required=True, help=SAMPLER_HELP)
    parser.add_argument("--port", type=int, default=None,
                        help=f"port to serve on (default: $GRADIO_SERVER_PORT, else {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens the page "
                             "to your network)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return parser.parse_args(argv)


def chosen_port(port: int | None) -> int:
    """--port, else $GRADIO_SERVER_PORT, else 7860; a port outside 1..65535 is a one-line error."""
    text = str(port) if port is not None else os.environ.get("GRADIO_SERVER_PORT", str(DEFAULT_PORT))
    where = "--port" if port is not None else "GRADIO_SERVER_PORT"
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{where}={text!r} is not a port number; give a whole number 1..65535") from None
    if not 1 <= value <= 65535:
        raise UserError(f"{where}={value} is not a port number; give a whole number 1..65535")
    return value


def check_port_free(host: str, port: int) -> None:
    """Fail fast, before loading anything, when ``host:port`` cannot be listened on (bound the way the server
    binds)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as err:
        raise UserError(port_message(host, port, err)) from None


def port_message(host: str, port: int, err: BaseException) -> str:
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
    return f"cannot listen on {host}:{port} ({reason}); choose another port with --port N or another --host"


def bypass_proxy(host: str) -> None:
    """Gradio checks at start that its own URL answers; an HTTP(S)_PROXY set for the internet would carry that
    request elsewhere and fail the start. Local addresses go direct."""
    for key in ("NO_PROXY", "no_proxy"):
        local = [os.environ.get(key, ""), "127.0.0.1", "localhost", "::1", host]
        os.environ[key] = ",".join(dict.fromkeys(x for x in local if x))


def serve(args: argparse.Namespace) -> None:
    port = chosen_port(args.port)
    check_port_free(args.host, port)
    from pipeline.sampler import Sampler

    sampler = Sampler.from_pretrained(args.sampler, device=args.device)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no version check, no telemetry
    bypass_proxy(args.host)
    import gradio as gr

    demo = build_demo(sampler, title=f"pipeline demo: {str(args.sampler).rstrip('/') or '/'}")
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{port}"
    try:
        demo.launch(server_name=args.host, server_port=port, share=False, quiet=True, prevent_thread_lock=True,
                    show_error=True, footer_links=[], ssr_mode=False, css=CSS,
                    theme=gr.themes.Default())  # its fonts are served by gradio (a GoogleFont would be fetched)
    except OSError as err:  # taken between the check and the launch
        raise UserError(port_message(args.host, port, err)) from None
    print(f"demo of {args.sampler} at {url} (Ctrl+C to stop)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops it like Ctrl+C: temporary files removed
    try:
        while demo.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        demo.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    return report_errors(lambda: serve(args), debug_requested(args))


if __name__ == "__main__":
    sys.exit(main())
