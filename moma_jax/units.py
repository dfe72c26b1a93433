"""Byte sizes on the command line: '80GB', '64GiB', '4MB' or a plain number of bytes."""

from __future__ import annotations

import argparse
import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def byte_size(text: str) -> int:
    """'80GB' -> 80e9, '64MiB' -> 64 * 2**20 (an argparse type)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 80GB, 64MiB or 4MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
