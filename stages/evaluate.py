"""Stage 4: score the samples and models.  python -m stages.evaluate --config configs/mnist.yaml [key=value]"""

import sys

from pipeline.cli import run_main, stage_parser


def main(argv=None) -> int:
    from pipeline.evaluate import run_evaluate

    parser = stage_parser(
        "evaluate",
        "Score the samples (FID, Inception Score, precision/recall, density/coverage, beside the real-data "
        "floor), the reconstructions and the priors; write RUN/eval/report.json and report.md with pictures.",
        ("fabric", "evaluate"),
        example="evaluate.k=5 evaluate.num_real=500",
    )
    return run_main(lambda cfg, run, args: run_evaluate(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
