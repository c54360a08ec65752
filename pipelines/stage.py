"""Running a stage from the command line: the same flags, config handling and error reporting for all."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.config import PARAMS_FILE, ConfigError, Params, load_params

if TYPE_CHECKING:
    import torch


class StageError(RuntimeError):
    """A stage cannot do its work for a reason the user can fix; the message says what and how."""


def compute_device(params: Params) -> torch.device:
    """Where the stage computes: ``base.device`` on this machine (``models.device.resolve_device``).

    Raises:
        StageError: ``cuda`` without a CUDA device.
    """
    from models.device import DeviceError, resolve_device  # torch: only the stages that compute import it

    try:
        return resolve_device(params.base.device)
    except DeviceError as error:
        raise StageError(str(error)) from None


class SetKey(argparse.Action):
    """A flag that sets one params.yaml key (``--epsilon 3`` is ``-P train.epsilon=3``); an empty value keeps it.

    MLflow Projects pass every entry-point parameter, so an empty string means "not given".
    """

    def __init__(self, option_strings: list[str], dest: str, key: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.key = key

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: object,
                 option_string: str | None = None) -> None:
        """Adds ``key=value`` to the overrides unless the value is empty."""
        if value != "":
            namespace.set_keys = [*getattr(namespace, "set_keys", []), f"{self.key}={value}"]


def run_stage(name: str, work: Callable[..., object], argv: list[str] | None = None,
              flags: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parses the common and the stage's own flags, runs ``work`` and turns known failures into one line.

    Args:
        name: the stage name, as in dvc.yaml and MLproject.
        work: the stage function, called with the resolved configuration (and the parsed flags when the stage
            has ``flags``).
        argv: the arguments (default ``sys.argv[1:]``).
        flags: adds the stage's own flags to the parser (``SetKey`` flags become overrides).
    """
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{name}", description=f"DP-CXR stage '{name}'.")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="the params.yaml to read")
    parser.add_argument("-P", "--set", dest="overrides_list", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key, e.g. -P prepare.workers=1")
    parser.add_argument("--overrides", default="", metavar="'KEY=VALUE ...'",
                        help="several overrides in one string (what MLflow Projects pass)")
    parser.set_defaults(set_keys=[])
    if flags is not None:
        flags(parser)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, [*args.set_keys, *shlex.split(args.overrides), *args.overrides_list])
        work(params) if flags is None else work(params, args)
    except (ConfigError, StageError, FileNotFoundError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
