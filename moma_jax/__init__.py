"""moma_jax: pre-training early-fusion mixed-modal LMs with modality-aware sparsity, in JAX.

Public entry points: `moma_jax.registry` (experiment names -> configs), `moma_jax.train.train`,
`moma_jax.model.Transformer`, `moma_jax.data` (bundled data, tokenizers, Grain pipeline).
"""

__version__ = "0.1.0"
