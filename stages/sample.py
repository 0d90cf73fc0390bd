"""Stage 3: sample images and export the sampler.  python -m stages.sample --config configs/mnist.yaml [key=value]"""

import sys

from pipeline.cli import run_main, stage_parser


def main(argv=None) -> int:
    from pipeline.sample import run_sample

    parser = stage_parser("Sample images (RUN/samples/samples.npz, grid.png) with temperature, top-k, top-p, labels "
                          "and guidance from the sample.* config keys, and export the sampler (RUN/sampler/).")
    return run_main(lambda cfg, run, args: run_sample(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
