"""The one list of experiment names, and how a name resolves to a config.

Experiments are functions returning a frozen `ExperimentConfig`, named in one of two ways:

- `@register("my_exp")` on a function of no arguments: one name;
- `@register_sizes("moma_4t4i", SIZES, stages=AUX_STAGES)` on a function of a size: the name
  `{arch}_{size}` for every size (`moma_4t4i_tiny`), and `{arch}_{suffix}_{size}` for every
  stage, a function `(config, size) -> config` applied to the sized one (`moma_4t4i_aux_tiny`).

The bundled experiments are the top-level `experiments` package beside `moma_jax/`. The library
never imports it: the registry loads it by module name on the first lookup, as `load_module`
loads a user's module (`--experiments MODULE`). The direction is experiments -> registry only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from moma_jax.config import ConfigError, ExperimentConfig, validate

ExperimentFn = Callable[[], ExperimentConfig]
SizedFn = Callable[[str], ExperimentConfig]
Stage = Callable[[ExperimentConfig, str], ExperimentConfig]
BUNDLED = "experiments"  # the top-level package of bundled experiments
AUX_STAGE = "aux"  # the suffix of an architecture's post-hoc aux-router stage


@dataclasses.dataclass(frozen=True)
class Entry:
    build: ExperimentFn
    summary: str  # one line, shown by --list and stored as the config's description
    module: str  # where it was declared


_REGISTRY: dict[str, Entry] = {}
_LOADED: set[str] = set()  # user modules already imported (loading twice is a no-op)


def _summary(fn: Callable, what: str) -> str:
    doc = (fn.__doc__ or "").strip()
    if not doc:
        raise ValueError(f"experiment {what!r} needs a docstring (what it shows, how to run it)")
    return doc.splitlines()[0]


def _add(name: str, entry: Entry) -> None:
    if name in _REGISTRY:
        raise ValueError(f"experiment {name!r} is registered twice")
    _REGISTRY[name] = entry


def register(name: str) -> Callable[[ExperimentFn], ExperimentFn]:
    """Registers a function of no arguments under `name`; returns it unchanged."""

    def wrap(fn: ExperimentFn) -> ExperimentFn:
        _add(name, Entry(fn, _summary(fn, name), fn.__module__))
        return fn

    return wrap


def _staged(fn: SizedFn, stage: Stage, size: str) -> ExperimentConfig:
    return stage(fn(size), size)


def register_sizes(
    arch: str, sizes: Iterable[str], stages: Mapping[str, Stage] | None = None
) -> Callable[[SizedFn], SizedFn]:
    """Registers a function of a size as `{arch}_{size}` for every size, and each stage as
    `{arch}_{suffix}_{size}` (the stage applied to the sized config); returns it unchanged."""

    def wrap(fn: SizedFn) -> SizedFn:
        summary = _summary(fn, arch)
        for size in sizes:
            _add(f"{arch}_{size}", Entry(functools.partial(fn, size), summary, fn.__module__))
            for suffix, stage in (stages or {}).items():
                build = functools.partial(_staged, fn, stage, size)
                line = f"{arch}_{size}, {_summary(stage, suffix)}"
                _add(f"{arch}_{suffix}_{size}", Entry(build, line, fn.__module__))
        return fn

    return wrap


def stage_name(experiment: str, suffix: str = AUX_STAGE) -> str:
    """A stage of a sized experiment: moma_4t4i_tiny -> moma_4t4i_aux_tiny."""
    arch, _, size = experiment.rpartition("_")
    return f"{arch}_{suffix}_{size}"


def _is_bundled(module: str) -> bool:
    return module == BUNDLED or module.startswith(BUNDLED + ".")


@functools.cache
def load_bundled() -> None:
    """Imports the bundled `experiments` package once (they register themselves).

    An installed moma_jax ships it as a top-level package; a source checkout whose install
    predates it (an older editable install) finds it beside `moma_jax/`.
    """
    try:
        importlib.import_module(BUNDLED)
    except ModuleNotFoundError as e:
        checkout = Path(__file__).resolve().parents[1]
        if e.name != BUNDLED or not (checkout / BUNDLED / "__init__.py").is_file():
            raise ConfigError(
                f"cannot import the bundled experiments ({e}); reinstall moma_jax"
            ) from e
        sys.path.append(str(checkout))
        importlib.import_module(BUNDLED)
    if not any(_is_bundled(entry.module) for entry in _REGISTRY.values()):
        where = getattr(sys.modules[BUNDLED], "__file__", None)
        raise ConfigError(
            f"the module {BUNDLED!r} ({where}) registered no experiments: another package "
            "of that name shadows moma_jax's bundled experiments"
        )


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
        if (e.name or "").startswith("moma_jax.experiments"):  # a module written before the move
            raise ConfigError(
                f"--experiments {spec}: it imports {e.name}, which moved: the bundled experiments "
                "are the top-level package `experiments` (e.g. `from experiments.dense import "
                "dense`), and the registry is `moma_jax.registry`"
            ) from e
        raise ConfigError(
            f"--experiments {spec}: cannot import it ({e}); give a module importable from the "
            "current directory or a path to a .py file"
        ) from e
    _LOADED.add(key)


def names() -> list[str]:
    load_bundled()
    return sorted(_REGISTRY)


def describe(name: str) -> str:
    """The experiment's one-line summary (the first line of its docstring)."""
    load_bundled()
    return _REGISTRY[name].summary


def source(name: str) -> str:
    """The module that declared the experiment (`experiments.moma`, a user's module)."""
    load_bundled()
    return _REGISTRY[name].module


def get(name: str) -> ExperimentConfig:
    """The validated config of a registered experiment, with its name and description filled in."""
    load_bundled()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown experiment {name!r}.{hint} (--list shows all names; your own experiments "
            "need --experiments MODULE)"
        )
    cfg = _REGISTRY[name].build()
    cfg = dataclasses.replace(cfg, name=name, description=describe(name))
    return validate(cfg)
