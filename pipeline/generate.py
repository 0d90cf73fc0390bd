"""Generate images with an exported sampler, without the training code; or turn your own images into codes and
back with its VQ-VAE (``encode``, ``reconstruct``), decoded exactly as training decoded its images.

    python -m pipeline.generate --sampler runs/mnist/sampler --num 64 --label 7 --out sevens.png
    python -m pipeline.generate encode --sampler runs/mnist/sampler --in a.png b.jpg --out codes.npz
    python -m pipeline.generate reconstruct --sampler runs/mnist/sampler --in a.png b.jpg --out recon.png
"""

from __future__ import annotations

import argparse
import sys

SAMPLER_HELP = "exported sampler folder (e.g. runs/mnist/sampler) or a Hugging Face Hub repo id (user/model)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("encode", "reconstruct"):
        return codes_main(argv[0], argv[1:])
    parser = argparse.ArgumentParser(description="Generate images with an exported sampler folder "
                                     "(config.json + model.safetensors) and write a PNG grid.")
    parser.add_argument("--sampler", required=True, help=SAMPLER_HELP)
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--label", default=None,
                        help="class: a name or an index (cat, 7), a list (cat,dog or 3,5,7, cycled), uniform, or "
                             "none (default: the sampler's default, uniform over classes for class-conditional priors)")
    parser.add_argument("--temperature", type=float, default=None, help="softmax temperature > 0 (default 1)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes (0 = off)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (1 = off)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", default="samples.png", help="PNG grid to write (default samples.png)")
    parser.add_argument("--npz", default=None, help="also write the uint8 images to this .npz")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    from pipeline.images import grid_image
    from pipeline.io import UserError, atomic_save_png, atomic_savez, debug_requested, report_errors
    from pipeline.sampler import Sampler

    def generate() -> None:
        if args.num < 1:
            raise UserError(f"--num {args.num}: must be >= 1 (the number of images to generate)")
        if args.batch_size < 1:
            raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
        if args.seed < 0:
            raise UserError(f"--seed {args.seed}: must be >= 0")
        sampler = Sampler.from_pretrained(args.sampler, device=args.device)
        defaults = sampler.sampling_defaults

        def pick(value, key, fallback):
            return value if value is not None else defaults.get(key, fallback)

        images = sampler.generate(
            args.num, temperature=pick(args.temperature, "temperature", 1.0), top_k=pick(args.top_k, "top_k", 0),
            top_p=pick(args.top_p, "top_p", 1.0), labels=pick(args.label, "labels", "uniform"),
            guidance=pick(args.guidance, "guidance", 1.0), seed=args.seed, batch_size=args.batch_size,
        )
        grid = grid_image(images, scale=2)  # built before anything is written
        atomic_save_png(args.out, grid)
        if args.npz:
            atomic_savez(args.npz, images=images)
        print(f"wrote {len(images)} images {images.shape[1:]} to {args.out}" + (f" and {args.npz}" if args.npz else ""))

    return report_errors(generate, debug_requested(args))


def codes_main(command: str, argv: list[str]) -> int:
    """``encode``: image files -> their code grids per level (an .npz of codes_<level> arrays, top first, and the
    file names); ``reconstruct``: image files -> a PNG of the images as decoded (top row) over their
    reconstructions from the codes (bottom row), and optionally the codes."""
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline.generate {command}",
        description="Encode image files to the sampler's code grids (.npz)" if command == "encode" else
        "Reconstruct image files through the sampler's VQ-VAE: originals over reconstructions (.png)")
    parser.add_argument("--sampler", required=True, help=SAMPLER_HELP)
    parser.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="IMAGE",
                        help="image files of any mode PIL opens (decoded as in training)")
    parser.add_argument("--out", required=True, help="the .npz of codes (encode) or the .png grid (reconstruct)")
    if command == "reconstruct":
        parser.add_argument("--codes", default=None, help="also write the codes to this .npz")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    args = parser.parse_args(argv)

    import numpy as np

    from pipeline.images import grid_image
    from pipeline.io import atomic_save_png, atomic_savez, debug_requested, report_errors
    from pipeline.sampler import Sampler

    def run() -> None:
        sampler = Sampler.from_pretrained(args.sampler, device=args.device)
        images = sampler.load_images(args.inputs)  # every file read before anything is written
        codes = sampler.encode(images)
        arrays = {f"codes_{n}": c for n, c in zip(sampler.level_names, codes)}
        arrays["files"] = np.asarray([str(f) for f in args.inputs])
        shapes = ", ".join(f"{n} {c.shape[1]}x{c.shape[2]}" for n, c in zip(sampler.level_names, codes))
        if command == "encode":
            atomic_savez(args.out, **arrays)
            print(f"encoded {len(images)} image(s) to {args.out} ({shapes} codes per image)")
            return
        recon = sampler.decode(codes)
        n, per = len(images), min(len(images), 16)
        rows = []  # up to 16 originals, then their 16 reconstructions below, short rows padded with white
        for i in range(0, n, per):
            for part in (images[i : i + per], recon[i : i + per]):
                rows += [part, np.full((per - len(part), *part.shape[1:]), 255, np.uint8)]
        grid = grid_image(np.concatenate(rows), nrow=per, scale=2)
        atomic_save_png(args.out, grid)
        if args.codes:
            atomic_savez(args.codes, **arrays)
        mse = float(np.mean(((images.astype(np.float64) - recon) / 127.5) ** 2))
        print(f"reconstructed {n} image(s) to {args.out} (originals over reconstructions; MSE {mse:.4g} on "
              f"[-1, 1]; {shapes} codes)" + (f"; codes in {args.codes}" if args.codes else ""))

    return report_errors(run, debug_requested(args))


if __name__ == "__main__":
    sys.exit(main())
