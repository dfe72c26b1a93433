"""The sparse feed-forward's config (`model.moe`) and the expert-group arithmetic that the
layer, flops and describe read from it: which modalities a group serves, its token share, its
slots, and the rows the expert compute runs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moma_jax import routers, routers_per_token, routers_relu  # noqa: F401 (registers rows)
from moma_jax.errors import ConfigError, require
from moma_jax.modality import MODALITY_NAMES

MIN_SLAB_SLOTS = 32  # per expert: a slab reads every expert's weights once
# How the expert slots run, one row per path (`model/moe.py` EXPERT_COMPUTE holds the function
# of each name): whether the path runs with experts sharded over `mesh.expert`.
EXPERT_COMPUTE = {
    "slabs": {"expert_parallel": True},
    "ragged_dot": {"expert_parallel": False},
}


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Routing of the sparse feed-forward (layer kind "moe"): expert groups and their routers.

    Tokens go deterministically to the expert group of their modality; inside a group a learned
    router picks experts. moe_8x: group_experts=(8,), modality_group=(0, 0); moma_4t4i: (4, 4),
    (0, 1); moma_1t1i: (1, 1), (0, 1) (a one-expert group has no router: pure modality untying).
    """

    group_experts: tuple[int, ...] = (4, 4)  # experts in each group
    modality_group: tuple[int, ...] = (0, 1)  # modality id -> group index
    # A row of `moma_jax/routers.py`: expert_choice | token_choice | token_choice_bpr | top_p |
    # token_choice_null | relu | top_any.
    routing: str = "expert_choice"
    router_score: str = "sigmoid"  # "sigmoid" (MoMa: per expert, not renormalised) | "softmax"
    # Expert choice: average experts per token c; each expert of group M takes
    # k_e = floor(b_M * c / E_M) tokens. Token choice: the capacity factor. Top-p: the experts
    # per token the ideal FLOPs assume (the measured mean is logged).
    capacity: float = 1.0
    top_k: int = 1  # token choice: experts per token (Switch 1, GShard 2)
    # Token choice, top_k > 1: gates renormalised over the chosen (GShard) or the softmax probs
    # as they are (DeepSeekMoE).
    top_k_renormalize: bool = True
    null_experts: int = 0  # token_choice_null: zero-cost null experts beside each routed group
    top_p: float = 0.4  # top-p routing: a token's experts reach this softmax mass (paper: 0.4)
    top_p_entropy_weight: float = 1e-4  # top-p routing's dynamic (entropy) loss (paper: 1e-4)
    # ReLU routing (ReMoE): the L1 coefficient's start and its factor per step (paper: 1e-8,
    # 1.2), steering the measured experts per token to `capacity`.
    relu_l1_init: float = 1e-8
    relu_l1_multiplier: float = 1.2
    # Top-any gating (DynMoE): scores sigmoid(tau cos(x, w_e)) against sigmoid(tau theta_e), tau
    # fixed (DynMoE's init_t = 1: tau = 1, not trained; at most 100, its clamp); its three
    # auxiliary losses (diverse-and-simple, balance, efficiency) each weighted by
    # top_any_loss_weight (router_aux_loss_coef=0.01 in DynMoE's MoE-LLaVA finetune_dynmoe.sh).
    top_any_tau: float = 1.0
    top_any_loss_weight: float = 0.01
    # Expert compute (model/grouped.py): the first `first_fraction` of the k_e a routing group
    # with the configured modality shares gives always runs, in one batched call; the rest in
    # slabs of tile_rows rows shared by a group's experts, only as many as the batch needs.
    # Real batches hold fewer routed tokens than N * share (padding is never routed; images
    # come in whole documents), hence a first part below the full share (measured:
    # docs/benchmarks.md, "Where the expert-compute defaults come from").
    first_fraction: float = 0.75
    tile_rows: int = 256
    # How the expert slots run (EXPERT_COMPUTE): "slabs" (batched SwiGLU per slab; the
    # default) or "ragged_dot" (sorted rows, jax.lax.ragged_dot grouped GEMMs, no padding;
    # slower where measured, docs/benchmarks.md).
    expert_compute: str = "slabs"
    # DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066), inside each expert group: fine-grained
    # experts of hidden ffn_hidden / granularity (give each token granularity - shared_experts
    # routed experts: `capacity` for expert choice, `top_k` for token choice, so the active
    # FLOPs stay the dense FFN's), and shared experts every token of the group's modalities
    # passes through (one always-on FFN of hidden shared_experts x ffn_hidden / granularity).
    granularity: int = 1
    shared_experts: int = 0
    # Routing is done inside fixed groups of this many tokens (whole packed rows or equal parts
    # of a row), so routing and the loss do not depend on the mesh, device count or batch size.
    routing_group_tokens: int = 4096
    # Token share of each modality, sizing the static expert buffers; () = from the data
    # manifest at the start of training (then saved in the run's config).
    modality_shares: tuple[float, ...] = ()
    router_noise: str = "none"  # "none" | "gumbel": sigmoid(x + G' - G'') (upcycling)
    # Benchmarking only: routers still run, but tokens go round-robin to experts (each
    # group's eligible tokens in order), so kernel cost can be told from routing imbalance.
    force_balanced: bool = False
    lb_loss_weight: float = 0.01  # token choice: Switch load-balancing loss
    # Token choice's balance loss: "switch" (E sum f P on first choices) | "deepseek"
    # (DeepSeekMoE's expert-level loss over all top-k choices, and with balance_devices > 1 and
    # device_lb_loss_weight > 0 its device-level loss over that many contiguous expert sets:
    # set it to the expert mesh axis's size; the loss never reads the mesh).
    balance_loss: str = "switch"
    balance_devices: int = 1
    device_lb_loss_weight: float = 0.0
    router_z_loss_weight: float = 0.001  # ST-MoE router z-loss (token choice)
    # The same z-loss on expert-choice routers: opt-in (0 = off; the MoMa paper uses none).
    ec_router_z_loss_weight: float = 0.0
    # LIMoE's per-modality entropy losses on any learned router (`routing.limoe_entropy_losses`;
    # opt-in, 0 = off): local (each token's routing entropy, per modality) and global (the
    # modality's marginal routing entropy held above `limoe_global_threshold` nats).
    limoe_local_weight: float = 0.0
    limoe_global_weight: float = 0.0
    limoe_global_threshold: float = 0.0

    # The expert-group arithmetic, in one place: used by the layer, flops and describe.

    def expert_hidden(self, ffn_hidden: int) -> int:
        """A routed expert's hidden size: the FFN's over the granularity (rounded)."""
        return max(1, round(ffn_hidden / self.granularity))

    @property
    def n_experts(self) -> int:
        return sum(self.group_experts)

    @property
    def n_groups(self) -> int:
        return len(self.group_experts)

    def modalities(self, group: int) -> tuple[int, ...]:
        """Modality ids routed to expert group `group`."""
        return tuple(m for m, g in enumerate(self.modality_group) if g == group)

    def group_name(self, group: int) -> str:
        """'text', 'image', or 'text+image' for a mixed group (metric prefixes)."""
        return "+".join(MODALITY_NAMES[m] for m in self.modalities(group))

    def group_share(self, group: int) -> float:
        """Token share of one expert group: the sum of its modalities' shares."""
        if not self.modality_shares:
            raise ConfigError(
                "model.moe.modality_shares is not set; training, describe and bench fill it from "
                "the data manifest; elsewhere set it "
                "(e.g. --set model.moe.modality_shares=0.77,0.23)"
            )
        return sum(self.modality_shares[m] for m in self.modalities(group))

    def router(self, group: int) -> routers.Router:
        """The routing method's row for expert group `group` (take-all for one expert)."""
        return routers.router_for(self, group)

    @property
    def needs_aux_routers(self) -> bool:
        """Whether a group's router ranks whole routing groups (causal routing needs aux
        routers)."""
        return any(self.router(g).needs_aux_router for g in range(self.n_groups))

    def experts_per_token(self, group: int) -> float:
        """Expert FFNs one token of the group uses under ideal routing (the paper's count)."""
        return self.router(group).experts_per_token(self, group)

    def group_slots(self, group: int) -> int:
        """Slots per expert of one group (C) in the routing result, per routing group of N.

        Expert choice never drops: C is the most an expert can take, floor(N * c / E) (every
        token of the group's modalities); a one-expert group holds all N tokens. Token choice
        keeps the method's capacity, ceil(capacity * N * share * top_k / E): its drops are
        part of the algorithm (Switch, GShard), counted in `dropped_frac`.
        """
        return self.router(group).slots(self, group)

    def routed_slots(self, group: int, tokens: int) -> int:
        """Slots each expert of the group fills when `tokens` tokens of its modalities are
        routed: k_e for expert choice (float32, as `routing.ec_k`), all of them for a
        one-expert group, up to the capacity for token choice (balanced)."""
        experts = self.group_experts[group]
        per_expert = np.float32(tokens) * np.float32(self.experts_per_token(group))
        return min(int(np.floor(per_expert / np.float32(experts))), self.group_slots(group))

    def slab_plan(self, expected: int, capacity: int, experts: int) -> tuple[int, int]:
        """(first, slab): slots per expert for `grouped.slab_apply`, when an expert expects
        `expected` of its `capacity` slots filled and `experts` share the weights read.

        first: `first_fraction` of `expected`, rounded up to 8 (real batches route fewer
        tokens than N x share: padding is never routed); all of `capacity` when less than
        one slab would be left, since an overflow slab reads (and its backward accumulates)
        every expert's weights, which with many experts cost more than the rows it saves.
        slab: the experts share `tile_rows` rows, at least `MIN_SLAB_SLOTS` each (small slabs
        ran many experts far slower). Measurements: docs/benchmarks.md, "Where the
        expert-compute defaults come from".
        """
        first = min(math.ceil(round(self.first_fraction * expected, 6) / 8) * 8, capacity)
        if capacity - first < MIN_SLAB_SLOTS:
            first = capacity
        per_expert = max(self.tile_rows // experts, MIN_SLAB_SLOTS)
        return first, max(1, min(per_expert, capacity - first))

    def _group_plan(self, group: int) -> tuple[int, int]:
        tokens = round(self.routing_group_tokens * self.group_share(group))
        expected = self.routed_slots(group, tokens)
        return self.slab_plan(expected, self.group_slots(group), self.group_experts[group])

    def first_slots(self, group: int) -> int:
        """Slots per expert that always run (`slab_plan` at the configured modality shares)."""
        return self._group_plan(group)[0]

    def slab_slots(self, group: int) -> int:
        """Slots per expert in one overflow slab (`slab_plan`)."""
        return self._group_plan(group)[1]

    def padded_slots(self, group: int) -> int:
        """The static slots per expert the expert compute holds: the first slots, then C
        rounded up to whole slabs."""
        first, t = self.first_slots(group), self.slab_slots(group)
        return first + -(-(self.group_slots(group) - first) // t) * t

    @property
    def static_rows(self) -> int:
        """Expert FFN rows per routing group if every slab ran (the worst case, never run)."""
        return sum(e * self.padded_slots(g) for g, e in enumerate(self.group_experts))

    def executed_slots(self, group: int, k: int) -> int:
        """Slots per expert that run when the longest expert holds k: the first slots, plus
        whole slabs for the rest."""
        first, t = self.first_slots(group), self.slab_slots(group)
        return first + -(-max(k - first, 0) // t) * t

    @property
    def executed_rows(self) -> int:
        """Expert FFN rows run per routing group whose modality mix is the configured shares
        (no padding tokens). The layer reports the measured value (`moe/rows_used_frac` x
        `static_rows`)."""
        rows = 0
        for g, experts in enumerate(self.group_experts):
            tokens = round(self.routing_group_tokens * self.group_share(g))
            rows += experts * self.executed_slots(g, self.routed_slots(g, tokens))
        return rows


def validate_sparse(moe: SparseConfig, seq_len: int, micro_batch_rows: int) -> None:
    """Checks `model.moe` (ConfigError naming the key and the fix)."""
    n_modalities, n_groups = len(MODALITY_NAMES), len(moe.group_experts)
    require(
        n_groups > 0, "model.moe.group_experts is empty; e.g. --set model.moe.group_experts=4,4"
    )
    for g, experts in enumerate(moe.group_experts):
        require(
            experts > 0,
            f"expert group {g} has {experts} experts (model.moe.group_experts="
            f"{moe.group_experts}); every group needs at least 1",
        )
    require(
        len(moe.modality_group) == n_modalities,
        f"model.moe.modality_group={moe.modality_group} must name a group for each of the "
        f"{n_modalities} modalities {MODALITY_NAMES}",
    )
    for m, g in enumerate(moe.modality_group):
        require(
            0 <= g < n_groups,
            f"modality {MODALITY_NAMES[m]!r} has no expert group: "
            f"model.moe.modality_group[{m}]={g}, but there are {n_groups} groups",
        )
    unused = sorted(set(range(n_groups)) - set(moe.modality_group))
    require(not unused, f"expert groups {unused} receive no modality (model.moe.modality_group)")
    routers.get_router(moe.routing)  # ConfigError with the close matches
    require(moe.capacity > 0, f"model.moe.capacity must be positive, got {moe.capacity}")
    for key in ("limoe_local_weight", "limoe_global_weight", "limoe_global_threshold"):
        require(getattr(moe, key) >= 0, f"model.moe.{key} must be >= 0, got {getattr(moe, key)}")
    require(moe.granularity >= 1, f"model.moe.granularity must be >= 1, got {moe.granularity}")
    require(
        moe.shared_experts >= 0, f"model.moe.shared_experts must be >= 0, got {moe.shared_experts}"
    )
    widened = any(
        moe.router(g).router_columns(moe, g) > moe.group_experts[g] for g in range(n_groups)
    )
    require(
        moe.null_experts == 0 or widened,
        f"model.moe.null_experts={moe.null_experts} has no effect: routing {moe.routing!r} "
        "adds no null experts (use model.moe.routing=token_choice_null, in groups of 2+ "
        "experts), or set it to 0",
    )
    require(
        moe.limoe_global_weight == 0 or moe.limoe_global_threshold > 0,
        "model.moe.limoe_global_weight > 0 needs model.moe.limoe_global_threshold > 0 (the "
        "global loss is max(0, threshold - entropy): 0 at threshold 0), e.g. ln(experts) / 2",
    )
    require(moe.null_experts >= 0, f"model.moe.null_experts must be >= 0, got {moe.null_experts}")
    top_k_limit = min(moe.router(g).router_columns(moe, g) for g in range(n_groups))
    require(0 < moe.top_p <= 1, f"model.moe.top_p must be in (0, 1], got {moe.top_p}")
    require(
        moe.top_p_entropy_weight >= 0,
        f"model.moe.top_p_entropy_weight must be >= 0, got {moe.top_p_entropy_weight}",
    )
    require(moe.relu_l1_init > 0, f"model.moe.relu_l1_init must be > 0, got {moe.relu_l1_init}")
    require(
        moe.relu_l1_multiplier > 1,
        f"model.moe.relu_l1_multiplier must be > 1 (1 would never adapt the coefficient), got "
        f"{moe.relu_l1_multiplier}",
    )
    require(
        0 < moe.top_any_tau <= 100,
        f"model.moe.top_any_tau must be in (0, 100] (DynMoE clamps its scale at 100), got "
        f"{moe.top_any_tau}",
    )
    require(
        moe.top_any_loss_weight >= 0,
        f"model.moe.top_any_loss_weight must be >= 0, got {moe.top_any_loss_weight}",
    )
    require(
        moe.balance_loss in ("switch", "deepseek"),
        f"model.moe.balance_loss={moe.balance_loss!r}: use switch or deepseek",
    )
    require(
        1 <= moe.balance_devices <= min(moe.group_experts),
        f"model.moe.balance_devices={moe.balance_devices} must be in 1..{min(moe.group_experts)} "
        "(each device set needs an expert of every group)",
    )
    require(
        moe.device_lb_loss_weight == 0
        or (moe.balance_loss == "deepseek" and moe.balance_devices > 1),
        f"model.moe.device_lb_loss_weight={moe.device_lb_loss_weight} needs "
        "model.moe.balance_loss=deepseek and model.moe.balance_devices > 1 (the device-level "
        "loss of DeepSeekMoE balances that many expert sets)",
    )
    require(
        moe.balance_loss == "switch" or moe.routing in ("token_choice", "token_choice_bpr"),
        f"model.moe.balance_loss=deepseek has no effect: routing {moe.routing!r} is not token "
        "choice (token_choice, token_choice_bpr)",
    )
    require(moe.tile_rows > 0, f"model.moe.tile_rows must be positive, got {moe.tile_rows}")
    require(
        0 <= moe.first_fraction <= 1,
        f"model.moe.first_fraction must be in [0, 1], got {moe.first_fraction}",
    )
    for key, value, choices in (
        ("expert_compute", moe.expert_compute, tuple(EXPERT_COMPUTE)),
        ("router_score", moe.router_score, ("sigmoid", "softmax")),
        ("router_noise", moe.router_noise, ("none", "gumbel")),
    ):
        require(value in choices, f"model.moe.{key}={value!r}: use {' or '.join(choices)}")
    require(
        1 <= moe.top_k <= top_k_limit,
        f"model.moe.top_k={moe.top_k} must be in 1..{top_k_limit} (the router's columns in "
        "the smallest group: its experts, and null experts where the routing has them)",
    )
    n = moe.routing_group_tokens
    require(
        n >= max(moe.group_experts),
        f"model.moe.routing_group_tokens={n} is smaller than the number of experts "
        f"{max(moe.group_experts)} in a group; use larger routing groups",
    )
    require(
        n % seq_len == 0 or seq_len % n == 0,
        f"model.moe.routing_group_tokens={n} must be a multiple or a divisor of "
        f"data.seq_len={seq_len} (routing groups are whole rows or equal parts of a row)",
    )
    micro_tokens = micro_batch_rows * seq_len
    require(
        micro_tokens % n == 0,
        f"a micro-batch holds {micro_tokens} tokens, not a multiple of "
        f"model.moe.routing_group_tokens={n}; change data.batch_size or the group size",
    )
    if moe.modality_shares:
        require(
            len(moe.modality_shares) == n_modalities,
            f"model.moe.modality_shares needs {n_modalities} values {MODALITY_NAMES}",
        )
        require(
            all(0 <= s <= 1 for s in moe.modality_shares)
            and abs(sum(moe.modality_shares) - 1) < 1e-3,
            f"model.moe.modality_shares={moe.modality_shares} must be in [0, 1] and sum to 1",
        )
