"""Analytic FLOPs per token and parameter counts.

Conventions: a multiply-add is 2 FLOPs; training = 3 x forward (backward = 2 x forward; the
recomputation of rematerialised layers is not model FLOPs). Attention scores and values use the
causal convention by default: a token at position t attends to t+1 keys, so a row of L tokens
averages (L+1)/2 keys; `attention="full"` counts all L keys, as XLA executes a masked L x L.
Norms, RoPE, softmax and the embedding lookup are not counted (they are < 1% at these shapes).
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from moma_jax.config import ModelConfig


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, attention: str = "causal") -> float:
    """Q/K/V/O projections plus scores and weighted values, per token, forward."""
    d, hk = cfg.d_model, cfg.n_heads * cfg.resolved_head_dim
    keys = (seq_len + 1) / 2 if attention == "causal" else seq_len
    return 2 * d * 3 * hk + 2 * hk * d + 2 * 2 * hk * keys


def ffn_flops_per_token(cfg: ModelConfig) -> float:
    """Dense SwiGLU: gate, up and down projections."""
    return 2 * 3 * cfg.d_model * cfg.resolved_ffn_hidden


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, attention: str = "causal") -> float:
    """Whole-model forward FLOPs per token (dense layers; LM head included)."""
    per_layer = attention_flops_per_token(cfg, seq_len, attention) + ffn_flops_per_token(cfg)
    return cfg.n_layers * per_layer + 2 * cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3 * forward_flops_per_token(cfg, seq_len)


def count_params(state: nnx.State) -> int:
    """Parameters in a (possibly abstract) state."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def paper_params(cfg: ModelConfig, experts: int = 1) -> float:
    """MoMa Table 1's formula: 2Vd + l(4d^2 + E * 8d^2)."""
    d = cfg.d_model
    return 2 * cfg.vocab_size * d + cfg.n_layers * (4 * d * d + experts * 8 * d * d)
