"""The one list of experiment names: `@register("dense_90m")` on a function returning a config.

This module is the mechanism only and imports no experiments: `moma_jax.experiments` registers
the bundled ones when imported, and `load_module` imports a user's module of experiments.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from moma_jax.config import ConfigError, ExperimentConfig, validate

ExperimentFn = Callable[[], ExperimentConfig]
_REGISTRY: dict[str, ExperimentFn] = {}
_LOADED: set[str] = set()  # user modules already imported (loading twice is a no-op)


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


def load_module(spec: str) -> None:
    """Imports a module of user experiments (they register themselves with `@register`).

    `spec` is a dotted module name importable from the current directory or `sys.path`
    (`my_experiments`, `lab.exps`) or the path of a `.py` file.
    """
    path = Path(spec)
    key = str(path.resolve()) if path.is_file() else spec
    if key in _LOADED:
        return
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise ConfigError(f"--experiments {spec}: no such file")
            name = f"moma_jax_user_experiments_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ConfigError(f"--experiments {spec}: not a Python module")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # scripts/ is sys.path[0] for entry points
            importlib.import_module(spec)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"--experiments {spec}: cannot import it ({e}); give a module importable from the "
            "current directory or a path to a .py file"
        ) from e
    _LOADED.add(key)


def names() -> list[str]:
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    """The first line of the experiment's docstring."""
    return (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]


def get(name: str) -> ExperimentConfig:
    """The validated config of a registered experiment, with its name and description filled in."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown experiment {name!r}.{hint} (--list shows all names; your own experiments "
            "need --experiments MODULE)"
        )
    cfg = _REGISTRY[name]()
    cfg = dataclasses.replace(cfg, name=name, description=describe(name))
    return validate(cfg)
