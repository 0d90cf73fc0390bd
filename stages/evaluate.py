"""Stage 4: evaluate samples, reconstructions and priors.  python -m stages.evaluate --config configs/mnist.yaml"""

import sys

from pipeline.cli import run_main, stage_parser


def main(argv=None) -> int:
    from pipeline.evaluate import run_evaluate

    parser = stage_parser("Score the samples (FID, Inception Score, precision/recall, density/coverage, beside the "
                          "real-data floor), the reconstructions and the priors; write RUN/eval/report.json and "
                          "report.md with pictures.")
    return run_main(lambda cfg, run, args: run_evaluate(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
