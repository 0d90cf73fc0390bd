"""Shared command-line handling for the stage entry points: ``--config``, ``--run``, ``key=value``
overrides, ``--debug``; user errors become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config
from pipeline.io import UserError

EPILOG = """\
overrides: any config key as section.key=value, e.g. stage1.max_steps=200 fabric.devices=2
  sample.labels=7 vqvae.codebook_size=256 (see the config reference in README.md).
  Errors in your input are printed as one line; add --debug (or DEBUG=1) for the traceback.
"""


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/mnist.yaml", help="YAML preset (default: configs/mnist.yaml)")
    parser.add_argument(
        "--run", "--run-dir", dest="run", default=None,
        help="run folder (default: runs/<config file stem>); stages hand work over in it. Under torchrun write "
             "--run-dir: torchrun reads --run as its own --run-path option",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints of this stage, start over")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def default_run_dir(config_path: str) -> Path:
    return Path("runs") / Path(config_path).stem


def run_main(fn: Callable[[Config, Path, argparse.Namespace], None], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> int:
    """Parse, load the config, call ``fn(cfg, run_dir, args)``; return the process exit code."""
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DEBUG", "") not in ("", "0")
    try:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run) if args.run else default_run_dir(args.config)
        fn(cfg, run_dir, args)
    except (ConfigError, UserError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        # Fabric's own launcher SIGKILLs the main process (rank 0) as soon as a child it started exits non-zero,
        # which would turn rank 0's 130 into 137 while it is still exiting; the children's code reaches no user.
        return 0 if _child_of_fabric_launcher() else 130
    return 0


def _child_of_fabric_launcher() -> bool:
    """A process started by Fabric's subprocess launcher (not torchrun, ``fabric run`` or SLURM): LOCAL_RANK > 0."""
    return (os.environ.get("LOCAL_RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" not in os.environ
            and "SLURM_JOB_ID" not in os.environ)
