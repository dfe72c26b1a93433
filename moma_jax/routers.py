"""Routing methods of the sparse feed-forward, one row each (`model.moe.routing`).

A row is everything the framework needs of a method: its slots per expert (the static buffer
`SparseConfig.group_slots` sizes), experts per token under ideal routing (the FLOPs factor),
whether it has a learned D x E router, whether causal routing needs an aux router
(`model/aux_router.py`), its teacher-forced route over the routing groups (dispatch, stats,
scores, auxiliary losses) and its causal route (each token decides alone, N slots per expert).
The layer (`model/moe.py`), the config checks, flops and describe ask the row; none of them
names a method. A one-expert group is the `take_all` row, whatever `model.moe.routing` says.

Rows whose experts per token vary (top-p, null experts, top-any) live in `routers_per_token.py`.
Add a method with `register_router(row)` (a test or an `--experiments` module can): the row's
route functions are JAX over [G, N, ...] arrays, built from `model/routing.py`.

This module sits at the bottom of the import graph (the config checks read it), so the routing
primitives are imported inside the route functions, where the model is already loaded.
"""

from __future__ import annotations

import abc
import difflib
import math
from typing import Any, NamedTuple, Protocol

import numpy as np

from moma_jax.errors import ConfigError


class SparseSettings(Protocol):
    """What a row reads of `model.moe` (`SparseConfig`)."""

    @property
    def routing(self) -> str: ...
    @property
    def routing_group_tokens(self) -> int: ...
    @property
    def group_experts(self) -> tuple[int, ...]: ...
    @property
    def capacity(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def router_score(self) -> str: ...
    @property
    def router_noise(self) -> str: ...
    @property
    def force_balanced(self) -> bool: ...
    @property
    def lb_loss_weight(self) -> float: ...
    @property
    def router_z_loss_weight(self) -> float: ...
    @property
    def ec_router_z_loss_weight(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_p_entropy_weight(self) -> float: ...
    @property
    def null_experts(self) -> int: ...
    @property
    def top_k_renormalize(self) -> bool: ...
    @property
    def relu_l1_init(self) -> float: ...
    @property
    def relu_l1_multiplier(self) -> float: ...
    @property
    def top_any_tau(self) -> float: ...
    @property
    def top_any_loss_weight(self) -> float: ...
    @property
    def balance_loss(self) -> str: ...
    @property
    def balance_devices(self) -> int: ...
    @property
    def device_lb_loss_weight(self) -> float: ...
    def group_share(self, group: int) -> float: ...


class GroupRouting(NamedTuple):
    """One expert group's routing inputs over G routing groups of N tokens (float32 logits)."""

    moe: SparseSettings
    slots: int  # C per expert: `Router.slots` (teacher-forced) or N (causal)
    logits_GxNxE: Any  # the main router's logits; None for a row without a router
    eligible_GxN: Any  # bool: the group's modalities, padding excluded
    count_G: Any  # int32: eligible tokens per routing group (b_M)
    key: Any = None  # router noise (teacher-forced only), or None
    aux_logits_GxNxE: Any = None  # causal, rows that need one: the aux router's logits
    router_DxE: Any = (
        None  # the learned router's weights (float32), for rows whose losses read them
    )
    threshold_E: Any = None  # the group's per-expert thresholds, rows with `has_thresholds`


class Routed(NamedTuple):
    """A route's result: the [G, E, C] dispatch, its stats (per routing group: `dropped`,
    `wasted`), the router scores [G, N, E] the metrics read, auxiliary losses (weighted), and
    the row's own scalar metrics (logged as `moe/{group}/{name}` beside the common ones)."""

    dispatch: Any
    stats: dict[str, Any]
    scores_GxNxE: Any
    losses: dict[str, Any]
    metrics: Any = None  # dict[str, scalar] or None


class Control(NamedTuple):
    """A loss weight that is training state (`train/controls.py`), not a constant: the row's
    loss `loss` enters the objective times a coefficient that starts at `init` and after every
    step is multiplied by `multiplier` while the row's metric `metric` (mean over layers and
    micro-batches) is above `target`, else divided by it (ReMoE's sparsity control)."""

    loss: str
    metric: str
    target: float
    init: float
    multiplier: float


class Router(abc.ABC):
    """One routing method. Subclass it, name it and define every method (an abstract base: a
    row leaving one undefined cannot be made)."""

    name: str = ""
    has_router: bool = True  # a learned D x E router (`router_DxE`, 2 D E FLOPs per token)
    needs_aux_router: bool = False  # ranks whole routing groups: causal routing needs one
    has_thresholds: bool = False  # learned per-expert thresholds (`router_threshold_E`, zeros)

    def router_logits(self, moe: SparseSettings, x_GxNxD: Any, w_DxE: Any) -> Any:
        """The router's logits from float32 tokens and weights: x W unless a row scores
        otherwise (top-any: a scaled cosine)."""
        import jax.numpy as jnp

        return jnp.einsum("gnd,de->gne", x_GxNxD, w_DxE)

    def router_columns(self, moe: SparseSettings, group: int) -> int:
        """Columns of the learned router (its logits): one per expert unless a row adds its
        own (null experts)."""
        return moe.group_experts[group]

    def control(self, moe: SparseSettings, group: int) -> Control | None:
        """The loss weight this row adapts during training, or None (a constant weight)."""
        return None

    @abc.abstractmethod
    def slots(self, moe: SparseSettings, group: int) -> int:
        """Slots per expert (C) in the teacher-forced dispatch of a routing group of N."""

    @abc.abstractmethod
    def experts_per_token(self, moe: SparseSettings, group: int) -> float:
        """Expert FFNs one token of the group uses under ideal routing (the ideal FLOPs)."""

    @abc.abstractmethod
    def route(self, r: GroupRouting) -> Routed:
        """Teacher-forced: the routing groups' tokens decided together."""

    @abc.abstractmethod
    def route_causal(self, r: GroupRouting) -> Routed:
        """Causal: every token decides alone (r.slots = N, nothing dropped)."""


def renormalize(moe: SparseSettings) -> bool:
    """Token choice's gates: the top-k probs over their sum (GShard) where k > 1 and
    `model.moe.top_k_renormalize`, else the softmax probs as they are (Switch, DeepSeekMoE)."""
    return moe.top_k > 1 and moe.top_k_renormalize


def threshold(r: GroupRouting, taken_GxNxE: Any, gate_GxNxE: Any, scores_GxNxE: Any) -> Routed:
    """Per-token decisions (taken, gate) of eligible tokens as an N-slot dispatch."""
    import jax
    import jax.numpy as jnp

    from moma_jax.model import routing

    taken_GxNxE = taken_GxNxE & r.eligible_GxN[..., None]
    dispatch = jax.vmap(routing.threshold_dispatch)(taken_GxNxE, gate_GxNxE)
    valid = jnp.sum(dispatch.valid_ExC, dtype=jnp.float32)
    stats = {"dropped": jnp.zeros(()), "wasted": dispatch.valid_ExC.size - valid}
    return Routed(dispatch, stats, scores_GxNxE, {})


class ExpertChoice(Router):
    """MoMa (Zhou et al. 2022): each expert takes its top k_e = floor(b_M * c / E) tokens;
    its buffer holds floor(N * c / E), the most k_e can be, so nothing is dropped. Causal: the
    aux router's score > 0.5, the main router's score as the gate."""

    name = "expert_choice"
    needs_aux_router = True

    def slots(self, moe: SparseSettings, group: int) -> int:
        n, experts = moe.routing_group_tokens, moe.group_experts[group]
        # float32, as routing computes k_e (`routing.ec_k`), so that k_e <= C always holds.
        per_expert = np.float32(n) * np.float32(moe.capacity) / np.float32(experts)
        return max(1, min(n, int(np.floor(per_expert))))

    def experts_per_token(self, moe: SparseSettings, group: int) -> float:
        return moe.capacity

    def route(self, r: GroupRouting) -> Routed:
        import jax

        from moma_jax.model import routing

        moe, logits_GxNxE = r.moe, r.logits_GxNxE
        experts = logits_GxNxE.shape[-1]
        if moe.router_noise == "gumbel" and r.key is not None:
            logits_GxNxE = routing.gumbel_sigmoid_logits(logits_GxNxE, r.key)
        scores_GxNxE = routing.router_scores(logits_GxNxE, moe.router_score)
        # Rank on logits (sigmoid) or log-probs (softmax): the float32 scores saturate
        # (sigmoid is exactly 1.0 from logit 16.6) and would tie; gates stay the scores.
        ranking_GxNxE = routing.ranking_scores(logits_GxNxE, moe.router_score)
        if moe.force_balanced:
            ranking_GxNxE = jax.vmap(lambda e: routing.round_robin(e, experts))(r.eligible_GxN)
        k_G = jax.vmap(lambda c: routing.ec_k(c, moe.capacity, experts))(r.count_G)
        dispatch, stats = jax.vmap(
            lambda s, e, k, rank: routing.expert_choice(s, e, k, r.slots, ranking_NxE=rank)
        )(scores_GxNxE, r.eligible_GxN, k_G, ranking_GxNxE)
        losses = {}
        if moe.ec_router_z_loss_weight > 0:  # opt-in: on the router's own logits, noise-free
            z_G = jax.vmap(routing.router_z_loss)(r.logits_GxNxE, r.eligible_GxN)
            losses["z_loss"] = moe.ec_router_z_loss_weight * z_G.mean()
        return Routed(dispatch, stats, scores_GxNxE, losses)

    def route_causal(self, r: GroupRouting) -> Routed:
        from moma_jax.model import routing

        scores_GxNxE = routing.router_scores(r.logits_GxNxE, r.moe.router_score)
        return threshold(r, r.aux_logits_GxNxE > 0, scores_GxNxE, scores_GxNxE)


class TokenChoice(Router):
    """Switch (top-1) / GShard (top-2): each token its top-k experts by softmax, capacity C
    (drops are the method's, counted), Switch load-balancing and ST-MoE z losses. Causal:
    top-k without capacity."""

    name = "token_choice"

    def slots(self, moe: SparseSettings, group: int) -> int:
        n, experts = moe.routing_group_tokens, moe.group_experts[group]
        share = moe.group_share(group)
        return max(1, min(n, math.ceil(moe.capacity * n * share * moe.top_k / experts)))

    def experts_per_token(self, moe: SparseSettings, group: int) -> float:
        return float(moe.top_k)

    def route(self, r: GroupRouting) -> Routed:
        import jax
        import jax.numpy as jnp

        from moma_jax.model import routing

        moe, logits_GxNxE = r.moe, r.logits_GxNxE
        probs_GxNxE = jax.nn.softmax(logits_GxNxE, axis=-1)
        if moe.force_balanced:
            experts = logits_GxNxE.shape[-1]
            turns_GxNxE = jax.vmap(lambda e: routing.round_robin(e, experts))(r.eligible_GxN)
            probs_GxNxE = turns_GxNxE / jnp.sum(turns_GxNxE, -1, keepdims=True)
        priority_GxN = self.priority(probs_GxNxE)
        dispatch, stats = jax.vmap(
            lambda p, e, o: routing.token_choice(p, e, moe.top_k, r.slots, renormalize(moe), o)
        )(probs_GxNxE, r.eligible_GxN, priority_GxN)
        z = jnp.mean(jax.vmap(routing.router_z_loss)(logits_GxNxE, r.eligible_GxN))
        losses = {"z_loss": moe.router_z_loss_weight * z}
        if moe.balance_loss == "deepseek":  # over every top-k choice, before capacity
            experts = probs_GxNxE.shape[-1]
            chosen_GxNxE, _ = jax.vmap(lambda p: routing.top_k_taken(p, moe.top_k, False))(
                probs_GxNxE
            )
            expert, device = routing.deepseek_balance_losses(
                probs_GxNxE.reshape(-1, experts),
                chosen_GxNxE.reshape(-1, experts),
                r.eligible_GxN.reshape(-1),
                moe.top_k,
                moe.balance_devices,
            )
            losses["lb_loss"] = moe.lb_loss_weight * expert
            if moe.device_lb_loss_weight > 0:
                losses["device_lb_loss"] = moe.device_lb_loss_weight * device
        else:  # Switch's, over the whole batch: f and P averaged over all groups
            losses["lb_loss"] = moe.lb_loss_weight * routing.switch_load_balance_loss(
                jnp.mean(stats["frac_tokens_E"], axis=0), jnp.mean(stats["mean_prob_E"], axis=0)
            )
        return Routed(dispatch, stats, probs_GxNxE, losses)

    def priority(self, probs_GxNxE: Any) -> Any:
        """The order tokens claim capacity in: None, their position."""
        return None

    def route_causal(self, r: GroupRouting) -> Routed:
        import jax

        from moma_jax.model import routing

        top_k = r.moe.top_k
        scores_GxNxE = jax.nn.softmax(r.logits_GxNxE, axis=-1)
        taken_GxNxE, gate_GxNxE = jax.vmap(
            lambda p: routing.top_k_taken(p, top_k, renormalize(r.moe))
        )(scores_GxNxE)
        return threshold(r, taken_GxNxE, gate_GxNxE, scores_GxNxE)


class BatchPrioritized(TokenChoice):
    """V-MoE's Batch Prioritized Routing (Riquelme et al. 2021, arXiv 2106.05974): token choice
    whose capacity is filled in order of each token's top routing weight, highest first (first
    choices still before second choices), not in position order, so overflow drops the tokens
    the router is least sure of. That order depends on every token of the routing group, future
    ones included, so causal routing needs an aux router, as expert choice does: a token takes
    its top-k experts where the aux router predicts the assignment kept."""

    name = "token_choice_bpr"
    needs_aux_router = True

    def priority(self, probs_GxNxE: Any) -> Any:
        import jax.numpy as jnp

        return jnp.max(probs_GxNxE, axis=-1)

    def route_causal(self, r: GroupRouting) -> Routed:
        import jax

        from moma_jax.model import routing

        top_k = r.moe.top_k
        scores_GxNxE = jax.nn.softmax(r.logits_GxNxE, axis=-1)
        taken_GxNxE, gate_GxNxE = jax.vmap(
            lambda p: routing.top_k_taken(p, top_k, renormalize(r.moe))
        )(scores_GxNxE)
        return threshold(r, taken_GxNxE & (r.aux_logits_GxNxE > 0), gate_GxNxE, scores_GxNxE)


class TakeAll(Router):
    """A one-expert group (pure modality untying): no router, every eligible token, gate 1,
    N slots; the same both ways."""

    name = "take_all"
    has_router = False

    def slots(self, moe: SparseSettings, group: int) -> int:
        return moe.routing_group_tokens

    def experts_per_token(self, moe: SparseSettings, group: int) -> float:
        return 1.0

    def route(self, r: GroupRouting) -> Routed:
        import jax
        import jax.numpy as jnp

        from moma_jax.model import routing

        dispatch, stats = jax.vmap(lambda e: routing.take_all(e, r.slots))(r.eligible_GxN)
        scores_GxNxE = jnp.ones(r.eligible_GxN.shape + (1,), jnp.float32)
        return Routed(dispatch, stats, scores_GxNxE, {})

    route_causal = route


ROUTERS: dict[str, Router] = {}
TAKE_ALL = TakeAll()  # every one-expert group's row; not a `model.moe.routing` choice


def register_router(row: Router) -> Router:
    """Adds a routing method under `row.name` (a name may be registered once)."""
    if not row.name or row.name in ROUTERS:
        raise ConfigError(f"routing method {row.name!r} is unnamed or registered already")
    ROUTERS[row.name] = row
    return row


def get_router(name: str) -> Router:
    """The row of `model.moe.routing`; ConfigError with the close matches otherwise."""
    if name not in ROUTERS:
        close = difflib.get_close_matches(name, ROUTERS, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            f"model.moe.routing={name!r} is not a routing method (known: "
            f"{', '.join(sorted(ROUTERS))}){hint}; a method your own module registers needs "
            "that module: --experiments MODULE"
        )
    return ROUTERS[name]


def router_for(moe: SparseSettings, group: int) -> Router:
    """The row that routes expert group `group`: take-all for one expert, else the method."""
    return TAKE_ALL if moe.group_experts[group] == 1 else get_router(moe.routing)


register_router(ExpertChoice())
register_router(TokenChoice())
register_router(BatchPrioritized())
