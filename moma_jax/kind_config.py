"""The configs of the layer kinds beyond dense / MoE / MoD, each a section of `ModelConfig`
(`model.moh`, `model.switchhead`, `model.motok`, `model.mamba`), and their checks, which
`config.validate` runs when the layer pattern has the kind.
"""

from __future__ import annotations

import dataclasses
import math

from moma_jax.errors import require
from moma_jax.modality import N_MODALITIES

# How attention experts are grouped (layer kinds `moh`, `switchhead`): "modality", one group
# per modality (a token is routed among its own modality's heads or experts, as MoMa's FFN
# experts); "shared", one group for every token (the papers' setting).
ATTENTION_EXPERT_GROUPS = ("modality", "shared")
MOH_GATES = ("paper", "scaled")  # model/moh.py
SCANS = ("auto", "associative", "sequential")  # model.mamba.scan (model/ssm.py)


@dataclasses.dataclass(frozen=True)
class MoHConfig:
    """Mixture-of-Head attention (layer kind `moh`, Jin et al. 2024, arXiv 2410.11842):
    `model.n_heads` heads in all: `shared_heads` always on, the rest split evenly into one set
    of routed heads per group, of which each token takes its `top_k` (model/moh.py)."""

    shared_heads: int = 2
    top_k: int = 1
    groups: str = "modality"  # one of ATTENTION_EXPERT_GROUPS
    # "paper": the paper's Eq. 4-5 gates (alpha-weighted softmaxes, routed ones not
    # renormalised); "scaled": SkyworkAI/MoH's code (top-k renormalised, each part scaled by
    # its head count and by 2, the balance loss by the routed heads).
    gates: str = "paper"
    balance_weight: float = 0.01  # the paper's beta


@dataclasses.dataclass(frozen=True)
class SwitchHeadConfig:
    """SwitchHead attention (layer kind `switchhead`, Csordas et al. 2023, arXiv 2312.07987):
    per head, the value and output projections are `experts` experts per group, each token
    taking the `top_k` of its group's by sigmoid score; queries and keys shared
    (model/switchhead.py)."""

    experts: int = 4
    top_k: int = 2
    groups: str = "modality"  # one of ATTENTION_EXPERT_GROUPS


@dataclasses.dataclass(frozen=True)
class TokenMixConfig:
    """Mixture of Tokens (layer kind `motok`, `model/mixture_of_tokens.py`; Antoniak et al.
    2023): at each position, the tokens of a fixed group of `group_rows` consecutive rows of the
    micro-batch are mixed per expert by a softmax over the group at `temperature` (0: its limit,
    each expert takes the group's top token), each of `experts` experts runs its one mixed
    token, and the outputs go back by the same weights. Causal routing (evaluation, generation)
    is the group of one: every expert on the token itself, their sum scaled by 1/group_rows."""

    experts: int = 8
    group_rows: int = 8
    # 0: the dense hidden x group_rows / experts, so the experts' FLOPs per token equal the dense
    # FFN's (the reference's flop_matched: dff x group_size, split over the experts).
    expert_hidden: int = 0
    temperature: float = 1.0

    def resolved_expert_hidden(self, ffn_hidden: int) -> int:
        return self.expert_hidden or max(1, ffn_hidden * self.group_rows // self.experts)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """The selective state-space mixer (Mamba, Gu & Dao 2023; layer kinds `mamba`, `mom`,
    `mamba_moe`, model/mamba.py): d_inner = int(expand x d_model) channels, each with a
    `d_state`-dim state; a causal depthwise conv1d over `d_conv` tokens; delta of rank `dt_rank`
    (0: ceil(d_model / 16), Mamba's "auto"), its bias initialised so softplus(bias) is
    log-uniform in [dt_min, dt_max]. Defaults are Mamba's."""

    d_state: int = 16
    d_conv: int = 4
    expand: float = 2.0
    dt_rank: int = 0
    dt_min: float = 0.001
    dt_max: float = 0.1
    # How the scan runs (model/ssm.py; the same recurrence, float32 rounding aside): one of
    # SCANS, "auto" = "sequential" on CPU, "associative" on accelerators. A compile key: a run
    # resumes under another value.
    scan: str = "auto"

    def d_inner(self, d_model: int) -> int:
        return int(self.expand * d_model)

    def resolved_dt_rank(self, d_model: int) -> int:
        return self.dt_rank or math.ceil(d_model / 16)


def attention_expert_groups(groups: str) -> int:
    """How many routing groups attention experts have (`ATTENTION_EXPERT_GROUPS`)."""
    return N_MODALITIES if groups == "modality" else 1


def validate_moh(moh: MoHConfig, n_heads: int) -> None:
    require(
        moh.groups in ATTENTION_EXPERT_GROUPS,
        f"model.moh.groups must be one of {ATTENTION_EXPERT_GROUPS}",
    )
    require(moh.gates in MOH_GATES, f"model.moh.gates must be one of {MOH_GATES}")
    groups = attention_expert_groups(moh.groups)
    routed = n_heads - moh.shared_heads
    require(
        moh.shared_heads >= 1 and routed > 0 and routed % groups == 0,
        f"model.moh.shared_heads={moh.shared_heads} must be at least 1 and leave routed heads "
        f"that split evenly into {groups} group(s) of model.n_heads={n_heads}",
    )
    require(
        1 <= moh.top_k <= routed // groups,
        f"model.moh.top_k={moh.top_k} must be in [1, {routed // groups}] (routed heads per group)",
    )
    require(moh.balance_weight >= 0, "model.moh.balance_weight must be >= 0")


def validate_switchhead(sh: SwitchHeadConfig) -> None:
    require(
        sh.groups in ATTENTION_EXPERT_GROUPS,
        f"model.switchhead.groups must be one of {ATTENTION_EXPERT_GROUPS}",
    )
    require(
        1 <= sh.top_k <= sh.experts,
        f"model.switchhead.top_k={sh.top_k} must be in [1, model.switchhead.experts={sh.experts}]",
    )


def validate_mamba(mb: MambaConfig, d_model: int) -> None:
    require(
        mb.d_state > 0 and mb.d_conv >= 2 and mb.d_inner(d_model) > 0 and mb.dt_rank >= 0,
        f"model.mamba needs d_state > 0, d_conv >= 2, expand x d_model >= 1 and dt_rank >= 0, "
        f"got {mb}",
    )
    require(
        0 < mb.dt_min <= mb.dt_max,
        f"model.mamba.dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {mb}",
    )
    require(mb.scan in SCANS, f"model.mamba.scan={mb.scan!r} is not one of {SCANS}")


def validate_motok(t: TokenMixConfig, rows: int) -> None:
    """`rows`: the rows of a micro-batch, which the token groups split."""
    require(
        t.experts > 0 and t.group_rows > 0 and t.expert_hidden >= 0 and t.temperature >= 0,
        f"model.motok needs experts > 0, group_rows > 0, expert_hidden >= 0 and "
        f"temperature >= 0: {t}",
    )
    require(
        rows % t.group_rows == 0,
        f"a micro-batch of {rows} rows does not split into Mixture-of-Tokens groups of "
        f"model.motok.group_rows={t.group_rows} rows",
    )
