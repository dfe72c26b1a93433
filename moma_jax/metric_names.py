"""Names of the per-layer metrics: built by the model, parsed back by reports, in one place.

A layer's own metric is logged as "layer_{i}/{name}" beside the mean over layers, "{name}"
(e.g. "layer_3/moe/text/load_2"). Runs written before keep reading: the names do not change.
"""

from __future__ import annotations

_PREFIX = "layer_"


def layer_metric(layer: int, name: str) -> str:
    """The key of metric `name` of layer `layer` (counted over the whole stack)."""
    return f"{_PREFIX}{layer}/{name}"


def split_layer_metric(key: str) -> tuple[int, str] | None:
    """(layer, name) of a per-layer key, None for any other key."""
    head, sep, name = key.partition("/")
    index = head.removeprefix(_PREFIX)
    if not sep or index == head or not index.isdigit():
        return None
    return int(index), name


def split_expert_load(name: str) -> tuple[str, int] | None:
    """(group, expert) of an expert's load metric "moe/{group}/load_{e}", None otherwise."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "moe" or not parts[2].startswith("load_"):
        return None
    expert = parts[2].removeprefix("load_")
    return (parts[1], int(expert)) if expert.isdigit() else None
