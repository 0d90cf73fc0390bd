"""The truncation sweep.  python -m stages.sweep --config configs/mnist.yaml [key=value]"""

import sys

from pipeline.cli import run_main, stage_parser


def main(argv=None) -> int:
    from pipeline.sweep import run_sweep

    parser = stage_parser(
        "sweep",
        "Sample at each evaluate.sweep_temperatures and evaluate.sweep_top_p value, score FID, precision and "
        "recall, and plot precision against recall (RUN/eval/sweep.png, sweep.json).",
        ("fabric", "sample", "evaluate"),
        example="evaluate.sweep_num=200",
    )
    return run_main(lambda cfg, run, args: run_sweep(cfg, run), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
