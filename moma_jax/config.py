"""Typed, frozen experiment configs: one dataclass per concern, composed into `ExperimentConfig`.

Experiments (in `experiments/`) return these; variants are made with `dataclasses.replace`; the
command line changes single keys with `--set section.key=value` (see `overrides.py`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moma_jax.modality import MODALITY_NAMES

DTYPES = ("float32", "bfloat16", "float16")
NORM_ORDERS = ("pre", "post")
REMAT_POLICIES = ("none", "full", "dots")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Routing of the sparse feed-forward (layer kind "moe"): expert groups and their routers.

    Tokens go deterministically to the expert group of their modality; inside a group a learned
    router picks experts. moe_8x: group_experts=(8,), modality_group=(0, 0); moma_4t4i: (4, 4),
    (0, 1); moma_1t1i: (1, 1), (0, 1) (a one-expert group has no router: pure modality untying).
    """

    group_experts: tuple[int, ...] = (4, 4)  # experts in each group
    modality_group: tuple[int, ...] = (0, 1)  # modality id -> group index
    routing: str = "expert_choice"  # "expert_choice" (MoMa, Zhou et al.) | "token_choice"
    router_score: str = "sigmoid"  # "sigmoid" (MoMa: per expert, not renormalised) | "softmax"
    # Expert choice: average experts per token c; each expert of group M takes
    # k_e = floor(b_M * c / E_M) tokens. Token choice: the capacity factor.
    capacity: float = 1.0
    top_k: int = 1  # token choice: experts per token (Switch 1, GShard 2)
    # Expert compute (model/grouped.py): rows per slab, shared by a group's experts. Slabs past
    # the longest expert's slots are skipped, so executed FFN rows exceed the routed ones by
    # under tile_rows per expert group (256 keeps the tiny and paper layouts within 1.07x of
    # the ideal FLOPs; larger slabs feed matmul units better, smaller ones waste less).
    tile_rows: int = 256
    # How the expert slots run: "slabs" (batched SwiGLU per slab; the default) or "ragged_dot"
    # (sorted rows and jax.lax.ragged_dot grouped GEMMs, no padding; measured slower).
    expert_compute: str = "slabs"
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
    router_z_loss_weight: float = 0.001  # ST-MoE router z-loss (token choice)

    # The expert-group arithmetic, in one place: used by the layer, flops and describe.

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

    def experts_per_token(self, group: int) -> float:
        """Expert FFNs one token of the group uses under ideal routing (the paper's count)."""
        if self.group_experts[group] == 1:
            return 1.0
        return float(self.top_k) if self.routing == "token_choice" else self.capacity

    def group_slots(self, group: int) -> int:
        """Slots per expert of one group (C) in the routing result, per routing group of N.

        Expert choice never drops: C is the most an expert can take, floor(N * c / E) (every
        token of the group's modalities); a one-expert group holds all N tokens. Token choice
        keeps the method's capacity, ceil(capacity * N * share * top_k / E): its drops are
        part of the algorithm (Switch, GShard), counted in `dropped_frac`.
        """
        n, experts = self.routing_group_tokens, self.group_experts[group]
        if experts == 1:
            return n
        if self.routing == "token_choice":
            share = self.group_share(group)
            return max(1, min(n, math.ceil(self.capacity * n * share * self.top_k / experts)))
        # float32, as routing computes k_e (`routing.ec_k`), so that k_e <= C always holds.
        per_expert = np.float32(n) * np.float32(self.capacity) / np.float32(experts)
        return max(1, min(n, int(np.floor(per_expert))))

    def routed_slots(self, group: int, tokens: int) -> int:
        """Slots each expert of the group fills when `tokens` tokens of its modalities are
        routed: k_e for expert choice (float32, as `routing.ec_k`), all of them for a
        one-expert group, up to the capacity for token choice (balanced)."""
        experts = self.group_experts[group]
        if experts == 1:
            return tokens
        per_expert = np.float32(tokens) * np.float32(self.experts_per_token(group))
        return min(int(np.floor(per_expert / np.float32(experts))), self.group_slots(group))

    def slab_slots(self, group: int) -> int:
        """Slots per expert in one slab of the expert compute (`grouped.slab_swiglu`): the
        group's experts share `tile_rows` rows, so padding is under tile_rows per group."""
        rest = self.group_slots(group) - self.first_slots(group)
        return max(1, min(self.tile_rows // self.group_experts[group], rest))

    def first_slots(self, group: int) -> int:
        """Slots per expert that always run (`grouped.slab_swiglu`): k_e of a routing group
        with the configured modality shares, rounded up to 8, at most C."""
        tokens = round(self.routing_group_tokens * self.group_share(group))
        return min(-(-self.routed_slots(group, tokens) // 8) * 8, self.group_slots(group))

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape and numerics (Chameleon-style early fusion)."""

    vocab_size: int = 65_536
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    head_dim: int = 0  # 0: d_model // n_heads
    ffn_hidden: int = 0  # 0: int(2/3 * 4 * d_model), rounded up to ffn_multiple_of
    ffn_multiple_of: int = 1  # Chameleon's code uses 256; 1 (off) reproduces the paper's Table 1
    # The repeating unit: one layer kind per entry; the stack is this unit scanned
    # n_layers / len(layer_pattern) times (e.g. ("mod", "dense") alternates two kinds).
    layer_pattern: tuple[str, ...] = ("dense",)
    norm_order: str = "post"  # "post": Swin-style, as Chameleon-34B / MoMa; "pre": Llama
    qk_norm: bool = True
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    z_loss_weight: float = 1e-5
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" (recompute the block) | "dots" (save matmul outputs)
    scan_unroll: int = 1  # layer units per scan iteration (n_units: fully unrolled)
    moe: SparseConfig = SparseConfig()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_ffn_hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 / 3 * 4 * self.d_model)
        m = self.ffn_multiple_of
        return -(-hidden // m) * m

    @property
    def n_units(self) -> int:
        return self.n_layers // len(self.layer_pattern)

    @property
    def has_experts(self) -> bool:
        """Whether a layer kind of the pattern reads `model.moe` (the sparse FFN)."""
        return "moe" in self.layer_pattern


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from and how they are packed into batches."""

    path: str = ""  # "": the bundled dataset, prepared on first use; else a prepared directory
    seq_len: int = 4096
    batch_size: int = 1536  # global rows per optimizer step
    micro_batches: int = 1  # gradient accumulation: rows are split into this many micro-batches
    seed: int = 0  # data order (shuffle); independent of parameter and routing seeds


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then linear decay to end_lr_fraction * peak (Chameleon/MoMa)."""

    peak_lr: float = 1e-4
    warmup_steps: int = 4000
    total_steps: int = 160_000  # the schedule's length; --steps only says where to stop
    end_lr_fraction: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 fills with the remaining devices (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Seeds, logging, evaluation and checkpoint cadence."""

    param_seed: int = 0
    routing_seed: int = 0  # router noise (used by sparse layers)
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 8
    checkpoint_every: int = 1000
    keep_last: int = 3
    keep_every: int = 0  # 0: off; else also keep every checkpoint whose step is a multiple
    async_checkpoint: bool = True
    # Start a fresh run from another run's latest checkpoint (sparse upcycling, train/upcycle.py):
    # parameters copied and expanded, optimizer and LR schedule reset, data position kept.
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a run."""

    name: str = ""
    description: str = ""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()


# Keys that may differ when a workdir is resumed: they change logging and bookkeeping, never the
# numbers a step computes. Every other key is part of the run's identity.
RESUME_SAFE_KEYS = frozenset(
    {
        "description",
        "run.log_every",
        "run.eval_every",
        "run.eval_batches",
        "run.checkpoint_every",
        "run.keep_last",
        "run.keep_every",
        "run.async_checkpoint",
    }
)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks a config before anything is built; returns it unchanged.

    Layer kinds are checked where layers are built (`model.kinds.check_layer_kinds`; the train
    command calls it right after this), so config depends on no model code.
    """
    m, d, o, r = cfg.model, cfg.data, cfg.optim, cfg.run
    for key, value in (
        ("model.vocab_size", m.vocab_size),
        ("model.d_model", m.d_model),
        ("model.n_layers", m.n_layers),
        ("model.n_heads", m.n_heads),
        ("data.seq_len", d.seq_len),
        ("data.batch_size", d.batch_size),
        ("data.micro_batches", d.micro_batches),
        ("optim.total_steps", o.total_steps),
        ("run.log_every", r.log_every),
        ("run.eval_every", r.eval_every),
        ("run.checkpoint_every", r.checkpoint_every),
        ("run.keep_last", r.keep_last),
    ):
        _require(value > 0, f"{key} must be positive, got {value}")
    for key, value in (
        ("model.head_dim", m.head_dim),
        ("model.ffn_hidden", m.ffn_hidden),
        ("optim.warmup_steps", o.warmup_steps),
        ("run.eval_batches", r.eval_batches),
        ("run.keep_every", r.keep_every),
    ):
        _require(value >= 0, f"{key} must be >= 0, got {value}")
    _require(m.ffn_multiple_of > 0, f"model.ffn_multiple_of must be positive: {m.ffn_multiple_of}")
    _require(
        m.head_dim > 0 or m.d_model % m.n_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
        "change one of them or set model.head_dim",
    )
    _require(m.resolved_head_dim % 2 == 0, f"head_dim {m.resolved_head_dim} must be even (RoPE)")
    _require(
        len(m.layer_pattern) > 0,
        "model.layer_pattern is empty; e.g. --set model.layer_pattern=dense",
    )
    _require(
        m.n_layers % len(m.layer_pattern) == 0,
        f"model.n_layers={m.n_layers} is not a multiple of the repeating unit "
        f"model.layer_pattern={m.layer_pattern} (length {len(m.layer_pattern)})",
    )
    _require(m.norm_order in NORM_ORDERS, f"model.norm_order must be one of {NORM_ORDERS}")
    _require(m.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}")
    for key in ("param_dtype", "compute_dtype"):
        value = getattr(m, key)
        _require(value in DTYPES, f"model.{key}={value!r} is not one of {DTYPES}")
    _require(
        d.batch_size % d.micro_batches == 0,
        f"data.batch_size={d.batch_size} is not divisible by data.micro_batches={d.micro_batches}",
    )
    _require(0 < o.peak_lr < 1, f"optim.peak_lr must be in (0, 1), got {o.peak_lr}")
    _require(0 <= o.end_lr_fraction <= 1, "optim.end_lr_fraction must be in [0, 1]")
    _require(o.warmup_steps < o.total_steps, "optim.warmup_steps must be < optim.total_steps")
    _require(o.clip_norm > 0, f"optim.clip_norm must be positive, got {o.clip_norm}")
    if m.has_experts:
        _validate_sparse(m.moe, d)
    for axis in ("data", "fsdp", "expert", "tensor"):
        size = getattr(cfg.mesh, axis)
        _require(size == -1 or size > 0, f"mesh.{axis} must be -1 (fill) or positive, got {size}")
    fills = [a for a in ("data", "fsdp", "expert", "tensor") if getattr(cfg.mesh, a) == -1]
    _require(len(fills) <= 1, f"at most one mesh axis may be -1 (fill), got {fills}")
    return cfg


def _validate_sparse(moe: SparseConfig, d: DataConfig) -> None:
    n_modalities, n_groups = len(MODALITY_NAMES), len(moe.group_experts)
    _require(
        n_groups > 0, "model.moe.group_experts is empty; e.g. --set model.moe.group_experts=4,4"
    )
    for g, experts in enumerate(moe.group_experts):
        _require(
            experts > 0,
            f"expert group {g} has {experts} experts (model.moe.group_experts="
            f"{moe.group_experts}); every group needs at least 1",
        )
    _require(
        len(moe.modality_group) == n_modalities,
        f"model.moe.modality_group={moe.modality_group} must name a group for each of the "
        f"{n_modalities} modalities {MODALITY_NAMES}",
    )
    for m, g in enumerate(moe.modality_group):
        _require(
            0 <= g < n_groups,
            f"modality {MODALITY_NAMES[m]!r} has no expert group: "
            f"model.moe.modality_group[{m}]={g}, but there are {n_groups} groups",
        )
    unused = sorted(set(range(n_groups)) - set(moe.modality_group))
    _require(not unused, f"expert groups {unused} receive no modality (model.moe.modality_group)")
    _require(moe.capacity > 0, f"model.moe.capacity must be positive, got {moe.capacity}")
    _require(moe.tile_rows > 0, f"model.moe.tile_rows must be positive, got {moe.tile_rows}")
    _require(
        moe.expert_compute in ("slabs", "ragged_dot"),
        f"model.moe.expert_compute={moe.expert_compute!r}: use slabs or ragged_dot",
    )
    _require(
        moe.routing in ("expert_choice", "token_choice"),
        f"model.moe.routing={moe.routing!r}: use expert_choice or token_choice",
    )
    _require(
        moe.router_score in ("sigmoid", "softmax"),
        f"model.moe.router_score={moe.router_score!r}: use sigmoid or softmax",
    )
    _require(
        moe.router_noise in ("none", "gumbel"),
        f"model.moe.router_noise={moe.router_noise!r}: use none or gumbel",
    )
    _require(
        1 <= moe.top_k <= min(moe.group_experts),
        f"model.moe.top_k={moe.top_k} must be in 1..{min(moe.group_experts)} (experts per group)",
    )
    n = moe.routing_group_tokens
    _require(
        n >= max(moe.group_experts),
        f"model.moe.routing_group_tokens={n} is smaller than the number of experts "
        f"{max(moe.group_experts)} in a group; use larger routing groups",
    )
    _require(
        n % d.seq_len == 0 or d.seq_len % n == 0,
        f"model.moe.routing_group_tokens={n} must be a multiple or a divisor of "
        f"data.seq_len={d.seq_len} (routing groups are whole rows or equal parts of a row)",
    )
    micro_tokens = d.batch_size // d.micro_batches * d.seq_len
    _require(
        micro_tokens % n == 0,
        f"a micro-batch holds {micro_tokens} tokens, not a multiple of "
        f"model.moe.routing_group_tokens={n}; change data.batch_size or the group size",
    )
    if moe.modality_shares:
        _require(
            len(moe.modality_shares) == n_modalities,
            f"model.moe.modality_shares needs {n_modalities} values {MODALITY_NAMES}",
        )
        _require(
            all(0 <= s <= 1 for s in moe.modality_shares)
            and abs(sum(moe.modality_shares) - 1) < 1e-3,
            f"model.moe.modality_shares={moe.modality_shares} must be in [0, 1] and sum to 1",
        )
