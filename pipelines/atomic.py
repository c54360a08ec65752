"""Outputs that appear whole or not at all: a stage that dies leaves the previous output, never half a new one."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yields a scratch folder that replaces ``out`` when the block succeeds and is removed when it fails.

    Args:
        out: the folder to (re)create.

    Yields:
        A sibling ``.<name>.partial`` folder to write into.
    """
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
