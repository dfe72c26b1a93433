"""Runtime helpers the entry points share (train, describe, bench): the experiment arguments,
JAX's persistent compilation cache, and the modality shares taken from the data manifest."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from moma_jax import data as data_lib
from moma_jax import registry
from moma_jax.config import ExperimentConfig, validate
from moma_jax.modality import MODALITY_NAMES
from moma_jax.model.kinds import check_layer_kinds, uses_modality_shares
from moma_jax.overrides import apply_overrides


def add_experiment_args(p: argparse.ArgumentParser, exp_required: bool = False) -> None:
    """--exp, --experiments and --set, spelled the same on every entry point."""
    p.add_argument("--exp", required=exp_required, help="experiment name (train.py --list)")
    add_experiments_module_arg(p)
    add_set_arg(p, "override a config key, e.g. --set model.d_model=256 (repeatable)")


def add_set_arg(p: argparse.ArgumentParser, text: str) -> None:
    """--set KEY=VALUE (repeatable), collected in `args.overrides`."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text
    )


def add_experiments_module_arg(p: argparse.ArgumentParser) -> None:
    """--experiments MODULE (repeatable): user modules that register experiments."""
    p.add_argument(
        "--experiments",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module (dotted name or .py path) that registers more experiments "
        "with @moma_jax.registry.register (repeatable)",
    )


def load_experiment_modules(args: argparse.Namespace) -> None:
    for module in args.experiments:
        registry.load_module(module)


def experiment_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """The registered experiment with `--set` overrides applied, validated, its layer kinds
    checked (ConfigError naming the key otherwise)."""
    cfg = validate(apply_overrides(registry.get(name), overrides))
    check_layer_kinds(cfg.model)
    return cfg


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache (MOMA_JAX_COMPILE_CACHE, default ~/.cache/moma_jax)."""
    import jax

    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moma_jax" / "jax"
    path = os.environ.get("MOMA_JAX_COMPILE_CACHE", str(default))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def with_data_shares(cfg: ExperimentConfig, manifest: dict) -> ExperimentConfig:
    """Fills model.moe.modality_shares from the data manifest's train split when unset."""
    moe = cfg.model.moe
    if moe.modality_shares or not uses_modality_shares(cfg.model):
        return cfg
    shares = manifest["splits"]["train"]["modality_shares"]
    moe = dataclasses.replace(moe, modality_shares=tuple(shares[n] for n in MODALITY_NAMES))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


def resolve_shares(cfg: ExperimentConfig) -> ExperimentConfig:
    """Modality shares from the experiment's data manifest (the bundled data by default), when
    the config does not set them: what training will use, so describe and bench count the same."""
    if cfg.model.moe.modality_shares or not uses_modality_shares(cfg.model):
        return cfg
    manifest = data_lib.load_manifest(data_lib.ensure_data(cfg.data.path or None))
    return with_data_shares(cfg, manifest)
