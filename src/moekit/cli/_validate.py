"""argparse ``type=`` validators shared by the ``moekit`` commands: every argument is checked while the command
line is parsed, before any work starts, and a bad value exits with status 2 and a message naming the argument
(argparse adds ``argument --steps:``), the value and what is expected."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, repeats, threads, jobs)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (where 0 means "off" or "the default")."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _writable_parent(path: Path, text: str) -> None:
    parent = path.resolve().parent
    while not parent.exists():  # created later; the first existing ancestor must be a writable directory
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write into {parent} (permission denied)")


def out_dir(text: str) -> str:
    """An output folder: a directory (existing or to be created), not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing file; expected a folder (existing or new)")
    if path.is_dir():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text!r}: cannot write into this folder (permission denied)")
    else:
        _writable_parent(path, text)
    return text


def out_file(text: str) -> str:
    """An output file (written or appended to): not an existing directory."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is an existing directory; expected a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write this file (permission denied)")
    _writable_parent(path, text)
    return text


def existing_dir(text: str) -> str:
    """An input folder that must exist (e.g. a checkpoint to load)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing folder")
    return text
