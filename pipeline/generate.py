"""Generate images with an exported sampler, without the training code.

    python -m pipeline.generate --sampler runs/mnist/sampler --num 64 --label 7 --out sevens.png
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate images with an exported sampler folder "
                                     "(config.json + model.safetensors) and write a PNG grid.")
    parser.add_argument("--sampler", required=True, help="exported sampler folder (e.g. runs/mnist/sampler)")
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


if __name__ == "__main__":
    sys.exit(main())
