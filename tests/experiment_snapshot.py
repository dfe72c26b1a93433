"""The resolved config of every registered experiment, as `--print-config` writes it (name and
description left out), kept in `tests/data/experiment_configs.json`.

`tests/test_experiment_snapshot.py` compares every name against it, so moving or rewriting the
experiments cannot change what a name trains. After a deliberate change of defaults, regenerate
it in the same commit and say why in the commit message:

    PYTHONPATH=$PWD python tests/experiment_snapshot.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moma_jax import registry
from moma_jax.overrides import to_dict

SNAPSHOT = Path(__file__).resolve().parent / "data" / "experiment_configs.json"
LEFT_OUT = ("name", "description")  # prose, free to change


def resolved(name: str) -> dict[str, Any]:
    """The registered experiment's config as JSON values (tuples as lists), prose left out."""
    cfg = json.loads(json.dumps(to_dict(registry.get(name))))
    return {k: v for k, v in cfg.items() if k not in LEFT_OUT}


def snapshot() -> dict[str, dict[str, Any]]:
    return {name: resolved(name) for name in registry.names()}


def main() -> None:
    SNAPSHOT.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT} ({len(registry.names())} experiments)")


if __name__ == "__main__":
    main()
