"""`--set section.key=value` overrides, config <-> dict, and the config diff behind the resume and
upcycling checks."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from moma_jax.config import RESUME_SAFE_KEYS, ConfigError, ExperimentConfig

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A frozen dataclass tree as plain JSON-able dicts (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Rebuilds a dataclass tree written by `to_dict`; unknown keys and values of the wrong
    type are ConfigErrors naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        elif typing.get_origin(hint) is tuple:
            if not isinstance(value, list | tuple):
                raise _wrong_type(prefix + name, hint, value)
            (item, _) = typing.get_args(hint)
            for v in value:
                _check_leaf(prefix + name, item, v, hint)
            kwargs[name] = tuple(value)
        else:
            _check_leaf(prefix + name, hint, value, hint)
            kwargs[name] = value
    return cls(**kwargs)


def _check_leaf(key: str, kind: Any, value: Any, hint: Any) -> None:
    """bool is not an int here, and an int is a float."""
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise _wrong_type(key, hint, value)


def _wrong_type(key: str, hint: Any, value: Any) -> ConfigError:
    name = getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint)
    return ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{'model.d_model': 512, ...} for every leaf key of a dataclass tree."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def _parse(key: str, text: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError
        if hint is int:
            return int(text.replace("_", ""))
        if hint is float:
            return float(text)
        if hint is str:
            return text
        if origin is tuple:
            (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
            return tuple(
                _parse(key, part.strip(), item) for part in text.split(",") if part.strip()
            )
    except ValueError:
        pass
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"--set {key}={text!r}: expected a value of type {name}")


def _replace(cfg: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replace(getattr(cfg, head), rest, value)})


def apply_overrides(cfg: ExperimentConfig, assignments: Iterable[str]) -> ExperimentConfig:
    """Applies `key=value` strings; unknown keys name their close matches."""
    leaves = flatten(cfg)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set expects key=value, got {assignment!r} (e.g. model.d_model=256)"
            )
        if key not in leaves or key == "name":
            close = difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown config key {key!r}{hint} (see the printed config for all keys)"
            )
        owner = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            owner = getattr(owner, part)
        hint_type = typing.get_type_hints(type(owner))[leaf]
        cfg = _replace(cfg, key.split("."), _parse(key, text, hint_type))
    return cfg


def config_diff(
    old: ExperimentConfig, new: ExperimentConfig, allowed: Callable[[str], bool]
) -> list[str]:
    """'key: old -> new' lines, sorted by key, for the leaf keys that differ and may not.

    The one diff behind both workdir checks (resume, upcycling source); each passes its own
    `allowed` predicate.
    """
    a, b = flatten(old), flatten(new)
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if not allowed(key) and a.get(key) != b.get(key)
    ]


def resume_conflicts(saved: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Keys whose change would alter a resumed run (any outside `RESUME_SAFE_KEYS`)."""
    return config_diff(saved, new, RESUME_SAFE_KEYS.__contains__)
