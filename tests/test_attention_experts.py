"""Attention experts per modality in a model: MoH (model/moh.py) and SwitchHead
(model/switchhead.py) see no later token, decode from the KV cache as the full causal forward
pass, and their FLOP-matched experiments stay within 5% of dense_tiny's ideal FLOPs per token.
The layers against their papers' equations and public code: test_moh.py, test_switchhead.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax import registry
from moma_jax.commands.describe import describe
from moma_jax.config import ModelConfig, MoHConfig, SwitchHeadConfig
from moma_jax.data import Vocab
from moma_jax.model import Transformer
from moma_jax.runtime import experiment_config
from moma_jax.sampling import Decoder

VOCAB = Vocab(n_text=24, n_image_codes=16)  # ids: text 0-23, image codes 24-39, specials 40-44
SMALL = ModelConfig(vocab_size=48, d_model=32, n_layers=2, head_dim=8)
MODELS = {
    "moh": dataclasses.replace(SMALL, n_heads=4, moh=MoHConfig(shared_heads=2, top_k=1)),
    "switchhead": dataclasses.replace(SMALL, n_heads=2, switchhead=SwitchHeadConfig(3, 2)),
}


def small_model(kind: str) -> Transformer:
    cfg = dataclasses.replace(MODELS[kind], layer_pattern=(kind,))
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_later_tokens_change_no_earlier_output(kind):
    """The leak measurement (evaluate --leak's question): change every token after t; the
    logits at positions <= t do not move, teacher forced or causal (no aux routers)."""
    model, rng, t = small_model(kind), np.random.default_rng(0), 20
    modality = (rng.random((2, 40)) < 0.5).astype(np.int32)
    tokens = np.where(modality == 1, rng.integers(24, 40, (2, 40)), rng.integers(0, 24, (2, 40)))
    changed = tokens.copy()
    changed[:, t + 1 :] = np.where(
        modality[:, t + 1 :] == 1,
        24 + (changed[:, t + 1 :] + 1) % 16,
        (changed[:, t + 1 :] + 1) % 24,
    )
    ones, positions = jnp.ones((2, 40), jnp.int32), jnp.broadcast_to(jnp.arange(40), (2, 40))

    @functools.partial(jax.jit, static_argnums=1)
    def forward(ids, routing):
        return model(ids, ones, positions, jnp.asarray(modality), routing=routing)[0]

    def logits(ids, routing):
        return np.asarray(forward(jnp.asarray(ids), routing))

    a, b = logits(tokens, "teacher_forced"), logits(changed, "teacher_forced")
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.array_equal(a[:, t + 1 :], b[:, t + 1 :])
    np.testing.assert_allclose(logits(tokens, "causal"), a, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cached_decoding_matches_the_full_forward_pass(kind):
    """A mixed-modal prompt, then 16 sampled tokens one at a time through the KV cache: the
    same logits as the full causal forward pass over the whole sequence."""
    model, rng = small_model(kind), np.random.default_rng(0)
    prompt = [40, 1, 2, 3, 42, 24, 25, 26, 43, 5]  # BOS, text, BOI, 3 codes, EOI, text
    decoder = Decoder(model, VOCAB, 32)
    tokens, rows = list(prompt), [decoder.feed(prompt)]
    for _ in range(16):
        p = np.exp(rows[-1][-1][:40] - rows[-1][-1][:40].max())
        tokens.append(int(rng.choice(40, p=p / p.sum())))
        rows.append(decoder.feed(tokens[-1:]))
    ids = np.asarray([tokens[:-1]])
    full = model(
        jnp.asarray(ids), jnp.ones_like(ids), jnp.arange(ids.shape[1])[None],
        jnp.asarray(VOCAB.modality_of(ids), jnp.int32), routing="causal",
    )[0][0]  # fmt: skip
    np.testing.assert_allclose(np.concatenate(rows)[:-1], np.asarray(full), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("exp", ["moh_tiny", "switchhead_tiny"])
def test_the_tiny_experiments_are_flop_matched_to_dense(exp):
    dense = describe(experiment_config("dense_tiny", []))["flops_per_token_ideal"]
    info = describe(experiment_config(exp, []))
    assert abs(info["flops_per_token_ideal"] / dense - 1) < 0.05
    assert info["flops_per_token_executed"] > info["flops_per_token_ideal"]  # masked compute


def test_every_head_or_one_expert_costs_what_dense_attention_does():
    """The FLOPs rows reduce to the dense layer's (plus their routers) where nothing is
    sparse: MoH with every routed head chosen, SwitchHead with one expert per head."""
    from moma_jax.flops import dense_layer_flops
    from moma_jax.model.moh import moh_layer_flops
    from moma_jax.model.switchhead import switchhead_layer_flops

    base = registry.get("dense_tiny").model
    d, h = base.d_model, base.n_heads
    moh = dataclasses.replace(base, moh=MoHConfig(shared_heads=1, top_k=h - 1, groups="shared"))
    one = dataclasses.replace(base, switchhead=SwitchHeadConfig(1, 1, groups="shared"))
    dense = dense_layer_flops(base, 256, "causal")[0]
    assert moh_layer_flops(moh, 256, "causal") == (dense + 2 * d * (h + 2),) * 2
    assert switchhead_layer_flops(one, 256, "causal") == (dense + 2 * 2 * d * h,) * 2
