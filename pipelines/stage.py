"""Running a stage from the command line: the same flags, config handling and error reporting for all."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from pipelines.config import PARAMS_FILE, ConfigError, Params, load_params


class StageError(RuntimeError):
    """A stage cannot do its work for a reason the user can fix; the message says what and how."""


def run_stage(name: str, work: Callable[[Params], object], argv: list[str] | None = None) -> None:
    """Parses ``--params`` and ``-P key=value`` overrides, runs ``work`` and turns known failures into one line.

    Args:
        name: the stage name, as in dvc.yaml and MLproject.
        work: the stage function.
        argv: the arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{name}", description=f"DP-CXR stage '{name}'.")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params.yaml to read")
    parser.add_argument("-P", "--set", dest="overrides_list", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key, e.g. -P prepare.workers=1")
    parser.add_argument("--overrides", default="", metavar="'KEY=VALUE ...'",
                        help="several overrides in one string (what MLflow Projects pass)")
    args = parser.parse_args(argv)
    try:
        work(load_params(args.params, [*shlex.split(args.overrides), *args.overrides_list]))
    except (ConfigError, StageError, FileNotFoundError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def pop_flag(args: list[str], flag: str) -> bool:
    """Removes every ``flag`` from ``args`` (a stage's own switch, e.g. ``--resume``) and says whether it was there."""
    found = flag in args
    while flag in args:
        args.remove(flag)
    return found


def pop_option(args: list[str], flag: str) -> str | None:
    """Removes ``flag VALUE`` from ``args`` and returns the last value given (None when absent, "" when empty)."""
    value = None
    while flag in args:
        at = args.index(flag)
        value = args[at + 1] if at + 1 < len(args) else ""
        del args[at:at + 2]
    return value
