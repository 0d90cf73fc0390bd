"""Command-line handling shared by the stages: ``--config``, ``--run``, ``key=value`` overrides, ``--debug``,
``--help`` listing the stage's own config keys; one lock per run folder; user errors, including the operating
system's (a read-only folder, a full disk), become one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path

from pipeline.config import PRIOR_NETS, Config, load_config
from pipeline.fabric import close_distributed
from pipeline.io import debug_requested, report_errors
from stages.runfolder import RunFolder
from stages.runlock import rank_zero_of_launch, run_folder_lock

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
            if dataclasses.is_dataclass(value):  # prior.top / prior.bottom: every kind's keys, one level deeper
                lines += _prior_net_help(f"{section}.{f.name}")
                continue
            lines.append(_help_line(f"{section}.{f.name}", f.type, value, comments.get(f.name, "")))
    return "\n".join(lines)


def _prior_net_help(key: str) -> list[str]:
    """The keys of a prior level: ``kind``, then each kind's own keys with their defaults."""
    lines = []
    for kind, cls in PRIOR_NETS.items():
        default, comments = cls(), _field_comments(cls)
        for f in dataclasses.fields(cls):
            if f.name == "kind" and lines:
                continue
            note = comments.get(f.name, "") if f.name == "kind" else f"{kind}: {comments.get(f.name, '')}"
            shown = "gpt" if f.name == "kind" else getattr(default, f.name)
            lines.append(_help_line(f"{key}.{f.name}", f.type, shown, note))
    return lines


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


def run_main(fn: Callable[[Config, RunFolder, argparse.Namespace], None], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> int:
    """Parse, load the config, lock the run folder, call ``fn(cfg, run, args)``; return the exit code."""
    args = parser.parse_args(argv)
    args.fresh = getattr(args, "fresh", False)

    def stage() -> None:
        cfg = load_config(Path(args.config).expanduser(), args.overrides)
        run = RunFolder(Path(args.run).expanduser() if args.run else default_run_dir(args.config))
        if not rank_zero_of_launch():  # the launcher's other processes share rank 0's run
            fn(cfg, run, args)
            return
        with run_folder_lock(run.root):
            fn(cfg, run, args)

    def main() -> None:
        try:
            stage()
        except BaseException:
            close_distributed(ok=False)
            raise
        close_distributed()

    return report_errors(main, debug_requested(args))
