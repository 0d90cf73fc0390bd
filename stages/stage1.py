"""Stage 1: train the VQ-VAE-2.  python -m stages.stage1 --config configs/mnist.yaml [key=value]"""

import sys

from pipeline.cli import run_main, stage_parser


def main(argv=None) -> int:
    from pipeline.stage1 import run_stage1

    parser = stage_parser(
        "stage1",
        "Stage 1: train the VQ-VAE-2 (checkpoints, logs and a reconstruction grid in RUN/stage1/).",
        ("data", "fabric", "vqvae", "stage1"), fresh=True,
        example="stage1.max_steps=200 vqvae.codebook_size=256",
    )
    return run_main(lambda cfg, run, args: run_stage1(cfg, run, fresh=args.fresh), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
