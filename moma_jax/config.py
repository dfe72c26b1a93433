"""Typed, frozen experiment configs: one dataclass per concern, composed into `ExperimentConfig`.

Experiments (the top-level `experiments/`) return these; variants are made with
`dataclasses.replace`; the command line changes single keys with `--set section.key=value`
(see `overrides.py`). `model.moe` is `sparse_config.SparseConfig`; the other layer kinds'
sections (`model.moh`, `model.switchhead`, `model.motok`, `model.mamba`) are in `kind_config.py`.
"""

from __future__ import annotations

import dataclasses

from moma_jax.errors import ConfigError, require
from moma_jax.kind_config import (
    MambaConfig,
    MoHConfig,
    SwitchHeadConfig,
    TokenMixConfig,
    validate_mamba,
    validate_moh,
    validate_motok,
    validate_switchhead,
)
from moma_jax.sparse_config import SparseConfig, validate_sparse

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "MambaConfig",
    "MeshConfig",
    "MoHConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "SparseConfig",
    "SwitchHeadConfig",
    "TokenMixConfig",
    "validate",
]

DTYPES = ("float32", "bfloat16", "float16")
NORM_ORDERS = ("pre", "post")
# model/attention.py: XLA's softmax attention; Pallas's flash-attention kernel (Triton, GPU)
# with the documents' segment ids; the same kernel interpreted on any backend (slow: tests).
ATTENTION = ("xla", "pallas", "pallas_interpret")
REMAT_POLICIES = ("none", "full", "dots")
AUX_ROUTERS = ("none", "joint", "posthoc")  # model/aux_router.py
AUTO_UNROLL_UNITS = 8  # model.scan_unroll=0 unrolls stacks of up to this many layer units


@dataclasses.dataclass(frozen=True)
class ModConfig:
    """Mixture-of-Depths (layer kinds `mod_*`): each routing group of
    `model.moe.routing_group_tokens` tokens sends its top floor(N x capacity) tokens through
    the wrapped block; the rest skip it unchanged."""

    capacity: float = 0.25  # MoMa's; the MoD paper's is 0.125
    # ST-MoE's router z-loss on the MoD router's logit (its square): opt-in, 0 = off (neither
    # the MoD nor the MoMa paper uses it).
    router_z_loss_weight: float = 0.0


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
    attention: str = "xla"  # one of ATTENTION: how softmax attention runs (the same math)
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    z_loss_weight: float = 1e-5
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"  # "none" | "full" (recompute the block) | "dots" (save matmul outputs)
    # Layer units per scan iteration; 0: all of them when there are at most AUTO_UNROLL_UNITS
    # and no remat (unrolled, remat saves no memory), else 1. Unrolled, the dense CPU step went
    # from 1.19x to 1.08x nanodo's (docs/benchmarks.md, 2026-12-06). KV-cached decoding
    # scans (0 there means 1: `decode_scan_unroll`).
    scan_unroll: int = 0
    moe: SparseConfig = SparseConfig()
    mod: ModConfig = ModConfig()
    moh: MoHConfig = MoHConfig()
    switchhead: SwitchHeadConfig = SwitchHeadConfig()
    motok: TokenMixConfig = TokenMixConfig()
    mamba: MambaConfig = MambaConfig()
    # Auxiliary routers for causal routing (model/aux_router.py): "none", "joint" (trained
    # with the model, own optimizer branch) or "posthoc" (main model loaded and frozen).
    aux_routers: str = "none"

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
    def resolved_scan_unroll(self) -> int:
        if self.scan_unroll:
            return self.scan_unroll
        return self.n_units if self.n_units <= AUTO_UNROLL_UNITS and self.remat == "none" else 1

    @property
    def decode_scan_unroll(self) -> int:
        """Layer units per scan iteration in KV-cached decoding: `scan_unroll` where set, else
        1. Unrolled, every call copies each layer's slice of the stacked weights on CPU (a
        static slice feeding a matmul is materialised), which one-token steps cannot amortise:
        scanned, a moma_4t4i decode step ran 4x faster (docs/benchmarks.md, 2026-12-07)."""
        return self.scan_unroll or 1

    @property
    def base_kinds(self) -> tuple[str, ...]:
        """The pattern's kinds with Mixture-of-Depths unwrapped (mod_moe -> moe)."""
        return tuple(k.removeprefix("mod_") for k in self.layer_pattern)

    @property
    def has_experts(self) -> bool:
        """Whether a layer kind of the pattern builds the sparse FFN of `model.moe`: `moe` and
        the kinds named `*_moe` (`mamba_moe`); `register_layer_kind` refuses a kind whose row
        (`sparse_ffn`) disagrees with its name, since this module sits below the table."""
        return any(k == "moe" or k.endswith("_moe") for k in self.base_kinds)

    @property
    def has_mod(self) -> bool:
        """Whether a layer kind of the pattern is Mixture-of-Depths (`mod_*`; the name is
        enforced against the row's `depth_routed` when the kind is registered)."""
        return any(k.startswith("mod_") for k in self.layer_pattern)


def mod_selected_tokens(cfg: ModelConfig) -> int:
    """k: the tokens of each routing group that go through a Mixture-of-Depths block."""
    return int(cfg.moe.routing_group_tokens * cfg.mod.capacity)


def mod_inner_config(cfg: ModelConfig) -> ModelConfig:
    """The config of the block a MoD layer wraps: its routing groups are the k selected tokens."""
    moe = dataclasses.replace(cfg.moe, routing_group_tokens=mod_selected_tokens(cfg))
    return dataclasses.replace(cfg, moe=moe)


def moe_routed_config(cfg: ModelConfig) -> ModelConfig:
    """The config the routed experts are built from: the FFN hidden size divided by
    `model.moe.granularity` (DeepSeekMoE's fine-grained experts; itself at granularity 1)."""
    if cfg.moe.granularity == 1:
        return cfg
    return dataclasses.replace(cfg, ffn_hidden=cfg.moe.expert_hidden(cfg.resolved_ffn_hidden))


def moe_shared_config(cfg: ModelConfig) -> ModelConfig:
    """The config of a sparse layer's shared experts (`model.moe.shared_experts` > 0): one
    always-on expert per expert group, over the same modalities (the take-all row), of hidden
    shared_experts x the fine-grained hidden (DeepSeekMoE's K_s shared experts, fused)."""
    moe = cfg.moe
    shared = dataclasses.replace(
        moe, group_experts=(1,) * moe.n_groups, shared_experts=0, granularity=1
    )
    hidden = moe.shared_experts * moe.expert_hidden(cfg.resolved_ffn_hidden)
    return dataclasses.replace(cfg, ffn_hidden=hidden, moe=shared)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where documents come from and how they are packed into batches."""

    path: str = ""  # "": the bundled dataset, prepared on first use; else a prepared directory
    seq_len: int = 4096
    batch_size: int = 1536  # global rows per optimizer step
    micro_batches: int = 1  # gradient accumulation: rows are split into this many micro-batches
    seed: int = 0  # data order (shuffle); independent of parameter and routing seeds
    # Document streams a batch is packed from (stream s takes documents s, s+S, ...; each packs
    # batch_size / S rows). 0: one per process, as the process count makes it. A fixed S (a
    # multiple of the process count) gives the same batches on any number of processes.
    streams: int = 0


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
# How the step is compiled, not what it computes (up to float rounding of fusions): the layer
# scan's unrolling, the attention kernel and the Mamba scan's path. A run resumes, and seeds an
# upcycled run or an aux-router stage, under other values (runs saved with the earlier scan
# default 1, say).
COMPILE_KEYS = ("model.scan_unroll", "model.attention", "model.mamba.scan")
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
        # Read only when a run starts fresh (its state then comes from the checkpoint): a suite
        # whose root moved, or a run copied from another suite, resumes with its new path.
        "run.init_from",
        # The mesh changes where the step runs, not what it computes (up to float rounding of
        # reductions split differently): a checkpoint restores onto any mesh (resharded).
        "mesh.data",
        "mesh.fsdp",
        "mesh.expert",
        "mesh.tensor",
        *COMPILE_KEYS,
    }
)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks a config before anything is built; returns it unchanged.

    Layer kinds are checked against their table (`model.kinds.check_layer_kinds`: every kind
    named and its row complete) by `runtime.experiment_config`, right after this, so config
    depends on no model code; what a kind reads (modality shares, aux routers) is in its row.
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
        require(value > 0, f"{key} must be positive, got {value}")
    for key, value in (
        ("model.head_dim", m.head_dim),
        ("model.ffn_hidden", m.ffn_hidden),
        ("optim.warmup_steps", o.warmup_steps),
        ("run.eval_batches", r.eval_batches),
        ("run.keep_every", r.keep_every),
    ):
        require(value >= 0, f"{key} must be >= 0, got {value}")
    require(
        m.scan_unroll >= 0,
        f"model.scan_unroll must be >= 0 (0: automatic, k: k layer units per scan step): "
        f"{m.scan_unroll}",
    )
    require(m.ffn_multiple_of > 0, f"model.ffn_multiple_of must be positive: {m.ffn_multiple_of}")
    require(
        m.head_dim > 0 or m.d_model % m.n_heads == 0,
        f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
        "change one of them or set model.head_dim",
    )
    require(m.resolved_head_dim % 2 == 0, f"head_dim {m.resolved_head_dim} must be even (RoPE)")
    require(
        len(m.layer_pattern) > 0,
        "model.layer_pattern is empty; e.g. --set model.layer_pattern=dense",
    )
    require(
        m.n_layers % len(m.layer_pattern) == 0,
        f"model.n_layers={m.n_layers} is not a multiple of the repeating unit "
        f"model.layer_pattern={m.layer_pattern} (length {len(m.layer_pattern)})",
    )
    require(m.norm_order in NORM_ORDERS, f"model.norm_order must be one of {NORM_ORDERS}")
    require(m.attention in ATTENTION, f"model.attention={m.attention!r} is not one of {ATTENTION}")
    require(
        m.aux_routers in AUX_ROUTERS,
        f"model.aux_routers={m.aux_routers!r} is not one of {AUX_ROUTERS}",
    )
    require(m.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}")
    for key in ("param_dtype", "compute_dtype"):
        value = getattr(m, key)
        require(value in DTYPES, f"model.{key}={value!r} is not one of {DTYPES}")
    require(
        d.batch_size % d.micro_batches == 0,
        f"data.batch_size={d.batch_size} is not divisible by data.micro_batches={d.micro_batches}",
    )
    require(
        d.streams >= 0 and (d.streams == 0 or d.batch_size % d.streams == 0),
        f"data.streams={d.streams} must be 0 (one per process) or divide "
        f"data.batch_size={d.batch_size}",
    )
    require(0 < o.peak_lr < 1, f"optim.peak_lr must be in (0, 1), got {o.peak_lr}")
    require(0 <= o.end_lr_fraction <= 1, "optim.end_lr_fraction must be in [0, 1]")
    require(o.warmup_steps < o.total_steps, "optim.warmup_steps must be < optim.total_steps")
    require(o.clip_norm > 0, f"optim.clip_norm must be positive, got {o.clip_norm}")
    for name, x in (("optim.b1", o.b1), ("optim.b2", o.b2)):
        require(0 <= x < 1, f"{name} must be in [0, 1) (Adam's moment decay), got {x}")
    for name, x in (("optim.eps", o.eps), ("model.norm_eps", m.norm_eps)):
        require(0 < x < 1, f"{name} must be a small positive number, got {x}")
    require(0 <= o.weight_decay < 1, f"optim.weight_decay must be in [0, 1), got {o.weight_decay}")
    if m.has_experts:
        validate_sparse(m.moe, d.seq_len, d.batch_size // d.micro_batches)
    validate_mamba(m.mamba, m.d_model)
    if m.has_mod:
        group = m.moe.routing_group_tokens
        require(
            0 < m.mod.capacity <= 1 and int(group * m.mod.capacity) >= 1,
            f"model.mod.capacity={m.mod.capacity} must be in (0, 1] and select at least one of "
            f"the model.moe.routing_group_tokens={group} tokens",
        )
        require(
            (d.batch_size // d.micro_batches * d.seq_len) % group == 0,
            f"a micro-batch of {d.batch_size // d.micro_batches} x {d.seq_len} tokens does not "
            f"split into Mixture-of-Depths routing groups of {group} tokens",
        )
    if "moh" in m.base_kinds:
        validate_moh(m.moh, m.n_heads)
    if "switchhead" in m.base_kinds:
        validate_switchhead(m.switchhead)
    if "motok" in m.layer_pattern:
        validate_motok(m.motok, d.batch_size // d.micro_batches)
    for axis in ("data", "fsdp", "expert", "tensor"):
        size = getattr(cfg.mesh, axis)
        require(size == -1 or size > 0, f"mesh.{axis} must be -1 (fill) or positive, got {size}")
    fills = [a for a in ("data", "fsdp", "expert", "tensor") if getattr(cfg.mesh, a) == -1]
    require(len(fills) <= 1, f"at most one mesh axis may be -1 (fill), got {fills}")
    return cfg
