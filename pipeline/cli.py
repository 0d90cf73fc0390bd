"""Shared command-line handling for the stage entry points: ``--config``, ``--run``, ``key=value``
overrides, ``--debug``; one lock per run folder; user errors, including the operating system's (a read-only
folder, a full disk), become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config
from pipeline.io import UserError

EPILOG = """\
overrides: any key above as section.key=value, e.g. {example}
  (the config reference in README.md explains each key).
  Errors in your input are printed as one line; add --debug (or DEBUG=1) for the traceback.
"""


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a config dataclass's source: the one place keys are explained."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            found = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
            if found:
                comments[found.group(1)] = found.group(2)
    return comments


def config_help(sections: tuple[str, ...]) -> str:
    """``section.key (type, default)  comment`` for every key of the given config sections."""
    defaults, hints = Config(), typing.get_type_hints(Config)
    lines = []
    for section in sections:
        cls = hints[section]
        lines.append(f"{section}:")
        values = getattr(defaults, section)
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            value = getattr(values, f.name)
            if dataclasses.is_dataclass(value):  # prior.top / prior.bottom: one level deeper
                for g in dataclasses.fields(value):
                    note = _field_comments(type(value)).get(g.name, "")
                    lines.append(_help_line(f"{section}.{f.name}.{g.name}", g.type, getattr(value, g.name), note))
                continue
            lines.append(_help_line(f"{section}.{f.name}", f.type, value, comments.get(f.name, "")))
    return "\n".join(lines)


def _help_line(key: str, tp: object, default: object, note: str) -> str:
    type_name = getattr(tp, "__name__", str(tp)).replace("typing.", "")
    head = f"  {key} ({type_name}, default {default!r})"
    return f"{head:<58} {note}".rstrip()


def stage_parser(stage: str, description: str, sections: tuple[str, ...], fresh: bool = False,
                 example: str = "fabric.threads=1") -> argparse.ArgumentParser:
    """The parser of ``python -m stages.<stage>``: its config ``sections`` are listed with types and defaults in
    ``--help``; ``--fresh`` only where the stage trains (and so resumes)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys of this stage (preset values may differ from these defaults):\n"
               + config_help(sections) + "\n\n" + EPILOG.format(example=example),
    )
    parser.add_argument("--config", default="configs/mnist.yaml", help="YAML preset (default: configs/mnist.yaml)")
    parser.add_argument(
        "--run", "--run-dir", dest="run", default=None,
        help="run folder (default: runs/<config file stem>); stages hand work over in it. Under torchrun write "
             "--run-dir: torchrun reads --run as its own --run-path option",
    )
    if fresh:
        parser.add_argument("--fresh", action="store_true", help="ignore this stage's checkpoints and start over")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def default_run_dir(config_path: str) -> Path:
    return Path("runs") / Path(config_path).stem


def debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("DEBUG", "") not in ("", "0")


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: the file, the reason, the fix."""
    target = err.filename2 or err.filename  # a copy or rename names its source first, the file we meant second
    where = f" {target}" if target else ""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space on that disk or choose a run folder on another one"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose a writable run folder (RUN=... or --run) or fix the folder's permissions"
    else:
        fix = "check the path and the disk"
    verb = "write" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM) else "use"
    return f"cannot {verb}{where}: {reason}; {fix} (files written before are kept)"


def report_errors(fn: Callable[[], object], debug: bool) -> int:
    """Run ``fn``; a user's error becomes one ``error:`` line and exit code 2 (the traceback with ``debug``)."""
    try:
        fn()
    except (ConfigError, UserError, OSError) as err:
        if debug:
            raise
        message = os_error_message(err) if isinstance(err, OSError) else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        # Fabric's own launcher SIGKILLs the main process (rank 0) as soon as a child it started exits non-zero,
        # which would turn rank 0's 130 into 137 while it is still exiting; the children's code reaches no user.
        return 0 if _child_of_fabric_launcher() else 130
    return 0


def run_main(fn: Callable[[Config, Path, argparse.Namespace], None], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> int:
    """Parse, load the config, lock the run folder, call ``fn(cfg, run_dir, args)``; return the exit code."""
    from pipeline.runlock import rank_zero_of_launch, run_folder_lock

    args = parser.parse_args(argv)
    args.fresh = getattr(args, "fresh", False)

    def main() -> None:
        cfg = load_config(Path(args.config).expanduser(), args.overrides)
        run_dir = Path(args.run).expanduser() if args.run else default_run_dir(args.config)
        if not rank_zero_of_launch():  # the launcher's other processes share rank 0's run
            fn(cfg, run_dir, args)
            return
        with run_folder_lock(run_dir):
            fn(cfg, run_dir, args)

    return report_errors(main, debug_requested(args))


def _child_of_fabric_launcher() -> bool:
    """A process started by Fabric's subprocess launcher (not torchrun, ``fabric run`` or SLURM): LOCAL_RANK > 0."""
    return (os.environ.get("LOCAL_RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" not in os.environ
            and "SLURM_JOB_ID" not in os.environ)
