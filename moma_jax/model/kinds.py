"""Layer kinds: the names `model.layer_pattern` may use, one `LayerKind` row per name.

A row holds everything the framework needs of a kind: how to build one layer, its forward
FLOPs per token (ideal and executed), whether it reads `model.moe.modality_shares`, whether
causal routing needs aux routers for it, what it carries between decode calls, the logical axes
its parameters name (with their mesh axes) and its extra fields in the describe report. Config
building (`runtime.experiment_config`), the FLOPs totals, describe, the decode cache and the
sharding rules all read this table, so a kind missing an entry is refused when the config is
built (`check_layer_kinds`), never after training starts. A new kind is one
`register_layer_kind(name, LayerKind(...))`, from any module (tests/test_extend.py).

A layer maps (x_BxLxD, ctx) -> (x_BxLxD, aux). Every built-in kind is the one residual `Block`
with different parts (`model/attention_kinds.py`, `model/ssm_kinds.py`); layers never ask which
model they belong to, and families differ only by the kinds in their pattern and by their
config. This module holds the table, what the framework derives from it, and `mod_kind`
(Mixture-of-Depths around any row).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
from flax import nnx

from moma_jax import flops as flops_lib
from moma_jax import sharding
from moma_jax.config import ConfigError, ExperimentConfig, ModelConfig
from moma_jax.model import aux_router
from moma_jax.model import cache as kv_cache
from moma_jax.model.mod import MoDBlock

Build = Callable[[ModelConfig, nnx.Rngs], nnx.Module]
# (cfg, seq_len, attention) -> (ideal, executed) forward FLOPs per token; see flops.py.
Flops = Callable[[ModelConfig, int, str], tuple[float, float]]
# (cfg, batch, length) -> the arrays one layer carries between decode calls (a KV cache).
DecodeState = Callable[[ModelConfig, int, int], dict[str, jax.Array]]
# (arrays, cache index) -> the object a layer receives as `ctx.kv` for one decode pass; it
# returns the updated arrays from `.arrays()`.
DecodeCache = Callable[[dict[str, jax.Array], jax.Array], Any]
ShardingRules = Mapping[str, str | tuple[str, ...] | None]


def _never(cfg: ModelConfig) -> bool:
    return False


def _no_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {}


def _no_aux_routers(cfg: ModelConfig) -> tuple[float, float]:
    return 0.0, 0.0


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One layer kind. `build`, `flops`, `sharding` and `decode_state` have no default that
    could be right for every kind: a row leaving one unset is refused by `check_layer_kinds`.

    build: (cfg, rngs) -> the layer, a module mapping (x_BxLxD, ctx) -> (x_BxLxD, aux).
    flops: (cfg, seq_len, attention) -> (ideal, executed) forward FLOPs per token.
    sharding: every logical axis its parameters name -> mesh axes (`sharding.LOGICAL_RULES`;
        registering adds new names there and refuses a name mapped differently).
    decode_state: (cfg, batch, length) -> the arrays it carries between decode calls, received
        as `ctx.kv` (wrapped by `decode_cache`); "none" for a kind that carries nothing.
    decode_cache: (arrays, cache index) -> the `ctx.kv` object of one decode pass: a
        `model.cache.KVCache` (attention), or the kind's own (a Mamba layer's recurrent state).
    reads_modality_shares: whether it sizes its work by `model.moe.modality_shares`.
    sparse_ffn: whether it builds the sparse FFN of `model.moe` (experts and a router). Such a
        kind is named `moe` or `*_moe`, and only such a kind: config sits below this table and
        reads the name (`ModelConfig.has_experts`) to check `model.moe`, apply the router's
        loss controls and the expert mesh checks, so `register_layer_kind` refuses a mismatch.
    depth_routed: whether it is Mixture-of-Depths around another kind (`mod_kind` sets it);
        named `mod_*`, and only such a kind, for the same reason (`ModelConfig.has_mod`).
    needs_aux_routers: (cfg) -> whether one of its routers ranks whole routing groups, so
        causal routing needs aux routers.
    describe: (cfg) -> extra fields of its entry in the describe report's layer plan.
    aux_routers: (cfg) -> (aux routers a token passes, their forward FLOPs per token) in one
        layer at causal inference (reported beside the ideal FLOPs, not part of them).
    """

    build: Build | None = None
    flops: Flops | None = None
    sharding: ShardingRules | None = None
    decode_state: DecodeState | Literal["none"] | None = None
    decode_cache: DecodeCache = kv_cache.KVCache
    reads_modality_shares: bool = False
    sparse_ffn: bool = False
    depth_routed: bool = False
    needs_aux_routers: Callable[[ModelConfig], bool] = _never
    describe: Callable[[ModelConfig], dict[str, Any]] = _no_fields
    aux_routers: Callable[[ModelConfig], tuple[float, float]] = _no_aux_routers

    def missing(self) -> list[str]:
        """The entries left unset."""
        return [
            f for f in ("build", "flops", "sharding", "decode_state") if getattr(self, f) is None
        ]


LAYER_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(name: str, row: LayerKind) -> LayerKind:
    """Adds a kind to the table (ConfigError for a taken name, a name that disagrees with the
    row's `sparse_ffn` or `depth_routed`, or a logical axis that `sharding.LOGICAL_RULES` maps
    differently). An incomplete row is accepted here and refused by `check_layer_kinds` when a
    config naming it is built."""
    if name in LAYER_KINDS:
        raise ConfigError(f"layer kind {name!r} is registered already")
    for field, flag, named, rule in (
        ("sparse_ffn", row.sparse_ffn, name == "moe" or name.endswith("_moe"), "moe or *_moe"),
        ("depth_routed", row.depth_routed, name.startswith("mod_"), "mod_*"),
    ):
        if flag != named:
            raise ConfigError(
                f"layer kind {name!r} has {field}={flag}, but the kinds named {rule} are exactly "
                f"those with {field}=True (config reads the name to run their checks): "
                + ("name it so" if flag else "rename it")
            )
    rules = sharding.LOGICAL_RULES
    for axis, target in (row.sharding or {}).items():
        if rules.get(axis, target) != target:
            raise ConfigError(
                f"layer kind {name!r} maps logical axis {axis!r} to {target!r}, but "
                f"sharding.LOGICAL_RULES maps it to {rules[axis]!r}"
            )
    rules.update(row.sharding or {})
    LAYER_KINDS[name] = row
    return row


def layer_kind(name: str) -> LayerKind:
    """The row of `name` (ConfigError naming the known kinds otherwise)."""
    if name not in LAYER_KINDS:
        close = difflib.get_close_matches(name, LAYER_KINDS, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown layer kind {name!r}; known: {sorted(LAYER_KINDS)}{hint}")
    return LAYER_KINDS[name]


def check_layer_kinds(cfg: ModelConfig) -> None:
    """Every entry of `model.layer_pattern` names a complete row (ConfigError otherwise)."""
    unknown = [k for k in cfg.layer_pattern if k not in LAYER_KINDS]
    if unknown:
        close = [c for k in unknown for c in difflib.get_close_matches(k, LAYER_KINDS, n=2)]
        hint = f"; did you mean {' or '.join(dict.fromkeys(close))}?" if close else ""
        raise ConfigError(
            f"model.layer_pattern has unknown layer kinds {unknown}; known: "
            f"{sorted(LAYER_KINDS)}{hint}; a kind your own module registers needs that "
            "module: --experiments MODULE"
        )
    for kind in dict.fromkeys(cfg.layer_pattern):
        missing = LAYER_KINDS[kind].missing()
        if missing:
            raise ConfigError(
                f"layer kind {kind!r} (model.layer_pattern) is registered without "
                f"{', '.join(missing)}; give its LayerKind row every entry"
            )


def build_layer(cfg: ModelConfig, kind: str, rngs: nnx.Rngs) -> nnx.Module:
    build = layer_kind(kind).build
    assert build is not None  # check_layer_kinds ran when the Transformer was built
    return build(cfg, rngs)


# ---- what the framework asks of a whole pattern ----------------------------------------------


def layer_flops(
    cfg: ModelConfig, kind: str, seq_len: int, attention: str = "causal"
) -> tuple[float, float]:
    """(ideal, executed) forward FLOPs per token of one layer of `kind`."""
    flops = layer_kind(kind).flops
    if flops is None:
        raise ConfigError(f"layer kind {kind!r} is registered without flops")
    return flops(cfg, seq_len, attention)


def forward_flops_per_token(
    cfg: ModelConfig, seq_len: int, attention: str = "causal", executed: bool = False
) -> float:
    """Whole-model forward FLOPs per token (LM head included)."""
    per_unit = sum(
        layer_flops(cfg, kind, seq_len, attention)[int(executed)] for kind in cfg.layer_pattern
    )
    return cfg.n_units * per_unit + 2 * cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int, executed: bool = False) -> float:
    """Training = 3 x forward (backward = 2 x forward; remat recomputation not counted)."""
    return 3 * forward_flops_per_token(cfg, seq_len, executed=executed)


def aux_router_flops_per_token(cfg: ModelConfig) -> tuple[float, float]:
    """(aux routers a token passes, their forward FLOPs per token) over the whole model at
    causal inference (`model/aux_router.py`), from each kind's row."""
    per_unit = [layer_kind(k).aux_routers(cfg) for k in cfg.layer_pattern]
    return cfg.n_units * sum(r for r, _ in per_unit), cfg.n_units * sum(f for _, f in per_unit)


def uses_modality_shares(cfg: ModelConfig) -> bool:
    """Whether a layer kind of the pattern sizes its work by `model.moe.modality_shares`."""
    return any(layer_kind(k).reads_modality_shares for k in cfg.layer_pattern)


def needs_aux_routers(cfg: ModelConfig) -> bool:
    """Whether a router of the pattern looks at a whole routing group (expert choice with more
    than one expert in a group, or Mixture-of-Depths), so causal routing needs aux routers."""
    return any(layer_kind(k).needs_aux_routers(cfg) for k in cfg.layer_pattern)


def require_for_causal(cfg: ExperimentConfig, workdir: object = "the run") -> None:
    """Causal routing needs aux routers where a router ranks whole routing groups; a run of
    `cfg` without them is refused (`aux_router.NoAuxRoutersError`, naming the experiments that
    train them)."""
    if needs_aux_routers(cfg.model) and cfg.model.aux_routers == "none":
        raise aux_router.NoAuxRoutersError(cfg, workdir)


def sharding_rules(*axes: str) -> dict[str, str | tuple[str, ...] | None]:
    """A row's `sharding` entry for logical axes the library already maps
    (`sharding.LOGICAL_RULES`)."""
    return {a: sharding.LOGICAL_RULES[a] for a in axes}


# ---- Mixture-of-Depths around any kind -------------------------------------------------------


def mod_kind(inner: LayerKind) -> LayerKind:
    """Mixture-of-Depths around `inner` (model/mod.py): its router on every token, the inner
    layer on the selected share of them; causal routing needs its aux router."""
    build, flops = inner.build, inner.flops

    def mod_block(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
        """Mixture-of-Depths around the kind (model/mod.py)."""
        assert build is not None
        return MoDBlock(cfg, build, rngs=rngs)

    return dataclasses.replace(
        inner,
        build=None if build is None else mod_block,
        flops=None if flops is None else flops_lib.mod_layer_flops(flops),
        sharding=None if inner.sharding is None else {**inner.sharding, **sharding_rules("embed")},
        depth_routed=True,
        needs_aux_routers=lambda cfg: True,
        describe=_no_fields,
        aux_routers=flops_lib.mod_aux_routers(inner.aux_routers),
    )
