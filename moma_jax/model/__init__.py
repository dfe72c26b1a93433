"""Flax NNX model code. Model code names logical axes only; `moma_jax.sharding` maps them.

Shape suffixes: a name ends with its axes, joined by "x" (`x_BxLxD`, `w_gate_ExDxF`); a
parameter's suffix is its full shape. One letter (or letter pair), one meaning, in the whole
package:

    B  batch rows                      L  sequence length (tokens per row)
    D  model width (d_model)           F  feed-forward hidden width
    H  attention heads                 Dh head dim (d_model / H unless set)
    R  rotary frequencies (Dh / 2)     V  vocabulary
    M  modalities (text, image)        E  experts in one expert group
    G  routing groups in a batch       N  tokens in one routing group
    C  buffer slots per expert         K  top-k choices per token (token choice)
    U  layer units (the scanned repeat of model.layer_pattern)
    A  micro-batches of one step (gradient accumulation)
    P  image patches, Q codebook entries (data/image_tokenizer.py)
    Di SSM channels (expand x D), Ds SSM state size, Dr delta rank, W conv width, Wp = W - 1
       the conv window a Mamba layer carries between decode calls (model/mamba.py)

Norm scales and biases are vectors over the normalised axis: `scale`, `bias` when shared,
`scale_MxD` / `scale_MxDh` when untied per modality (MoT).
"""

# the built-in rows of the layer-kind table (model/kinds.py), in this order
from moma_jax.model import (
    attention_kinds,  # noqa: F401  (dense, moe, mot, moh, switchhead, motok, mod_*)
    ssm_kinds,  # noqa: F401  (mamba, mom, mamba_moe)
)
from moma_jax.model.block import Block
from moma_jax.model.kinds import LAYER_KINDS, LayerKind, mod_kind, register_layer_kind
from moma_jax.model.transformer import Transformer

__all__ = ["LAYER_KINDS", "Block", "LayerKind", "Transformer", "mod_kind", "register_layer_kind"]
