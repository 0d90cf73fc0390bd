"""Stage 2: extract code grids, train the priors.  python -m stages.stage2 --config configs/mnist.yaml [key=value]"""

import sys

from pipeline.cli import run_main, stage_parser


def main(argv=None) -> int:
    from pipeline.stage2 import run_stage2

    parser = stage_parser(
        "stage2",
        "Stage 2: extract the code grids with the stage-1 model (RUN/codes/), then train one prior per level, "
        "top first (RUN/stage2/<level>/).",
        ("fabric", "prior", "stage2"), fresh=True,
        example="stage2.max_steps=500 prior.top.n_layer=6",
    )
    return run_main(lambda cfg, run, args: run_stage2(cfg, run, fresh=args.fresh), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
