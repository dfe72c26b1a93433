"""The one list of experiment names: `@register("dense_90m")` on a function returning a config."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable

from moma_jax.config import ConfigError, ExperimentConfig, validate

ExperimentFn = Callable[[], ExperimentConfig]
_REGISTRY: dict[str, ExperimentFn] = {}


def register(name: str) -> Callable[[ExperimentFn], ExperimentFn]:
    """Registers an experiment function under `name` ({architecture}_{size})."""

    def wrap(fn: ExperimentFn) -> ExperimentFn:
        if name in _REGISTRY:
            raise ValueError(f"experiment {name!r} is registered twice")
        if not (fn.__doc__ or "").strip():
            raise ValueError(
                f"experiment {name!r} needs a docstring (what it shows, how to run it)"
            )
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load() -> None:
    importlib.import_module("experiments")


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    """The first line of the experiment's docstring."""
    _load()
    return (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]


def get(name: str) -> ExperimentConfig:
    """The validated config of a registered experiment, with its name and description filled in."""
    _load()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown experiment {name!r}.{hint} (--list shows all names)")
    cfg = _REGISTRY[name]()
    cfg = dataclasses.replace(cfg, name=name, description=describe(name))
    return validate(cfg)
