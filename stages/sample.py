"""Stage 3: sample images and export the sampler.  python -m stages.sample --config configs/mnist.yaml [key=value]"""

import sys

from pipeline.cli import run_main, stage_parser


def main(argv=None) -> int:
    from pipeline.sample import run_sample

    parser = stage_parser(
        "sample",
        "Sample images (RUN/samples/samples.npz, grid.png) with temperature, top-k, top-p, labels and "
        "guidance from the sample.* config keys, and export the sampler (RUN/sampler/).",
        ("fabric", "sample"),
        example="sample.num=64 sample.labels=7 sample.guidance=2",
    )
    return run_main(lambda cfg, run, args: run_sample(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
