"""Causal routing and cached decoding on small random models of every architecture: no leak from
the future in causal mode (and a measurable one teacher forced), the same numbers both ways for
models without group-ranking routers, and cached logits equal to the full causal forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax.config import ConfigError, ModelConfig, SparseConfig
from moma_jax.data import Vocab
from moma_jax.model import Transformer
from moma_jax.model.routing import threshold_dispatch
from moma_jax.sampling import Decoder

VOCAB = Vocab(n_text=24, n_image_codes=16)  # ids: text 0-23, image codes 24-39, specials 40-44
EC = SparseConfig(group_experts=(4, 4))
ARCHS = {
    "dense": (("dense",), SparseConfig()),
    "moe_8x": (("moe",), SparseConfig(group_experts=(8,), modality_group=(0, 0))),
    "moma_1t1i": (("moe",), SparseConfig(group_experts=(1, 1))),
    "moma_4t4i": (("moe",), EC),
    "switch_8x": (
        ("moe",),
        SparseConfig(
            group_experts=(8,),
            modality_group=(0, 0),
            routing="token_choice",
            router_score="softmax",
            capacity=1.25,
        ),
    ),  # fmt: skip
    "switch_8x_bpr": (  # capacity 0.5: drops, so the priority order matters
        ("moe",),
        SparseConfig(
            group_experts=(8,),
            modality_group=(0, 0),
            routing="token_choice_bpr",
            router_score="softmax",
            capacity=0.5,
        ),
    ),  # fmt: skip
    "mot": (("mot",), SparseConfig()),
    "mod_moma_4t4i": (("mod_moe", "moe"), EC),
    "mod_dense": (("mod_dense", "dense"), SparseConfig()),
    "mamba": (("mamba",), SparseConfig()),  # a recurrent state instead of a KV cache
    "mom": (("mom",), SparseConfig()),
    "moe_mamba": (("mamba_moe",), EC),
    # DeepSeekMoE's form inside MoMa's groups: a take-all shared expert beside routed ones
    "moma_shared": (("moe",), SparseConfig(group_experts=(4, 4), granularity=2, shared_experts=1)),
    "mod_mot": (("mod_mot", "mot"), SparseConfig()),
    "mixed": (("mot", "moe", "mom", "dense"), EC),  # every kind of decode-sliced weight at once
}
B, L = 2, 64


def _model(arch: str, aux: str = "joint", units: int = 0) -> Transformer:
    """A small model of `arch`: 2 layers, or one unit of its pattern where that is longer;
    `units` repeats of the pattern where given."""
    pattern, moe = ARCHS[arch]
    n_layers = len(pattern) * units if units else max(2, len(pattern))
    moe = SparseConfig(
        **{**moe.__dict__, "routing_group_tokens": 64, "modality_shares": (0.7, 0.3)}
    )
    cfg = ModelConfig(
        vocab_size=48, d_model=32, n_layers=n_layers, n_heads=2, layer_pattern=pattern, moe=moe,
        aux_routers=aux,
    )  # fmt: skip
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    modality = (rng.random((B, L)) < 0.4).astype(np.int32)
    tokens = np.where(modality == 1, rng.integers(24, 40, (B, L)), rng.integers(0, 24, (B, L)))
    return {
        "tokens": tokens,
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.broadcast_to(np.arange(L), (B, L)),
        "modality": modality,
    }


def _logits(model: Transformer, batch: dict, routing: str) -> np.ndarray:
    tokens, segments, positions, modality = (
        jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions", "modality")
    )
    return np.asarray(model(tokens, segments, positions, modality, routing=routing)[0])


def test_threshold_dispatch_against_numpy():
    rng = np.random.default_rng(0)
    taken = rng.random((10, 3)) < 0.4
    gate = rng.random((10, 3)).astype(np.float32)
    dsp = threshold_dispatch(jnp.asarray(taken), jnp.asarray(gate))
    for e in range(3):
        tokens = np.nonzero(taken[:, e])[0]  # each expert's tokens, in order, as a prefix
        n = len(tokens)
        assert np.asarray(dsp.valid_ExC[e])[:n].all() and not np.asarray(dsp.valid_ExC[e])[n:].any()
        np.testing.assert_array_equal(np.asarray(dsp.token_index_ExC[e])[:n], tokens)
        np.testing.assert_array_equal(np.asarray(dsp.gate_ExC[e])[:n], gate[tokens, e])
        assert np.all(np.asarray(dsp.gate_ExC[e])[n:] == 0)


# "mixed" only combines kinds checked one by one here (its 4-layer compile cost 22 s of CI)
@pytest.mark.parametrize("arch", sorted(set(ARCHS) - {"mixed"}))
def test_causal_routing_never_sees_the_future(arch):
    """Only the tokens after t change; the outputs at positions <= t must not move at all."""
    model, batch, t = _model(arch), _batch(), L // 2
    changed = dict(batch, tokens=batch["tokens"].copy())
    rng = np.random.default_rng(1)
    tail = changed["tokens"][:, t + 1 :]
    is_image = batch["modality"][:, t + 1 :] == 1
    tail[:] = np.where(is_image, rng.integers(24, 40, tail.shape), rng.integers(0, 24, tail.shape))
    a, b = _logits(model, batch, "causal"), _logits(model, changed, "causal")
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.array_equal(a[:, t + 1 :], b[:, t + 1 :])  # the change itself is seen
    if arch in ("moe_8x", "moma_4t4i", "mod_moma_4t4i", "mod_dense", "switch_8x_bpr", "moe_mamba"):
        # The training routers rank the whole group: the same change leaks into the past.
        a, b = _logits(model, batch, "teacher_forced"), _logits(model, changed, "teacher_forced")
        assert np.abs(a[:, : t + 1] - b[:, : t + 1]).max() > 1e-4


@pytest.mark.parametrize("arch", ["dense", "moma_1t1i", "mot", "mamba", "mom"])
def test_models_without_group_routers_are_the_same_both_ways(arch):
    model, batch = _model(arch, aux="none"), _batch()
    np.testing.assert_allclose(
        _logits(model, batch, "causal"), _logits(model, batch, "teacher_forced"), atol=1e-5
    )


def test_causal_routing_without_aux_routers_is_refused():
    with pytest.raises(ConfigError, match="auxiliary routers"):
        _logits(_model("moma_4t4i", aux="none"), _batch(), "causal")


@pytest.mark.parametrize(
    "arch",
    ["dense", "moma_4t4i", "moe_8x", "mot", "mod_moma_4t4i", "switch_8x_bpr", "mamba", "mom",
     "moe_mamba", "moma_shared", "mod_mot", "mixed"],
)  # fmt: skip
def test_cached_decoding_matches_the_full_forward_pass(arch):
    """A prompt, then 32 tokens one at a time through the KV cache (sampled from the cached
    logits); the full causal forward pass over the whole sequence gives the same logits."""
    model, rng = _model(arch), np.random.default_rng(0)
    prompt = [40, 1, 2, 3, 42, 24, 25, 26, 43, 5]  # BOS, text, BOI, 3 codes, EOI, text
    decoder = Decoder(model, VOCAB, 64)
    tokens, rows = list(prompt), [decoder.feed(prompt)]
    for _ in range(32):
        p = np.exp(rows[-1][-1][:40] - rows[-1][-1][:40].max())
        tokens.append(int(rng.choice(40, p=p / p.sum())))
        rows.append(decoder.feed(tokens[-1:]))
    cached = np.concatenate(rows)[:-1]
    ids = np.asarray([tokens[:-1]])
    full = model(
        jnp.asarray(ids), jnp.ones_like(ids), jnp.arange(ids.shape[1])[None],
        jnp.asarray(VOCAB.modality_of(ids), jnp.int32), routing="causal",
    )[0][0]  # fmt: skip
    np.testing.assert_allclose(cached, np.asarray(full), atol=2e-5, rtol=1e-5)
    assert len(set(tokens[len(prompt) :])) > 1  # a real sequence, not one token repeated


@pytest.mark.parametrize(
    "arch", ["moma_4t4i", "mod_moma_4t4i", "mot", "mom", "moma_shared", "mixed"]
)
def test_one_token_steps_read_expert_weights_from_the_unit_stack(arch, monkeypatch):
    """In a one-token decode step every expert (or modality) loop gets its weights still
    stacked over the layer units (3 units: not the 2 modalities nor 4 experts, so a layer's
    own [M or E, ...] weights cannot pass for a stack) with the unit's index (`Context.unit`),
    so it reads only the chosen slices; the prompt (many tokens) gets each layer's own
    weights. Equality with the full forward pass is the test above."""
    from moma_jax.model import grouped

    seen, run = [], grouped.chosen_experts_apply

    def spy(fn, x, dispatch, weights, unit=None):
        seen.append((unit is not None, [w.shape for w in weights]))
        return run(fn, x, dispatch, weights, unit)

    monkeypatch.setattr(grouped, "chosen_experts_apply", spy)
    model = _model(arch, units=3)
    decoder = Decoder(model, VOCAB, 16)
    decoder.feed([40, 1, 2])
    assert not seen  # the prompt runs the batched paths on each layer's own weights
    decoder.feed([3])
    assert seen and all(stacked for stacked, _ in seen)
    # [U, E or M, ...]: a layer's own weights [E or M, ...] with the units axis in front
    assert model.cfg.n_units == 3
    assert all(s[0] == 3 and len(s) >= 3 for _, shapes in seen for s in shapes)


def test_cache_needs_causal_routing():
    model = _model("dense")
    with pytest.raises(ConfigError, match="causal"):
        ids = jnp.zeros((1, 4), jnp.int32)
        model(ids, ids + 1, ids, ids, cache=model.init_cache(1, 8), cache_index=jnp.int32(0))


def test_jitted_decoder_compiles_once_per_shape():
    model = _model("mod_moma_4t4i")
    decoder = Decoder(model, VOCAB, 16)
    decoder.feed([40, 1])
    for token in (2, 3, 4):
        decoder.feed([token])
    assert decoder.index == 5
    assert jax.tree.leaves(decoder.cache)[0].shape[2] == 16


@pytest.mark.parametrize(
    "arch", ["dense", "moma_4t4i", "mod_moma_4t4i", "mot", "switch_8x_bpr", "mom", "moe_mamba"]
)
def test_batched_decoding_rows_equal_each_row_decoded_alone(arch):
    """Three prompts of different lengths, left-padded into one cache, then one sampled token
    per row and step; row 2 stops after 3 tokens and feeds padding (not present) from then on.
    Every row's logits equal those of the same tokens through a one-row decoder."""
    model, rng = _model(arch), np.random.default_rng(1)
    prompts = [[40, 1, 2, 3, 42, 24, 25, 26, 43, 5], [40, 7], [40, 42, 30, 31]]
    rows, longest = len(prompts), max(map(len, prompts))
    pad = np.array([longest - len(p) for p in prompts])
    block = np.full((rows, longest), VOCAB.pad, np.int32)
    for r, p in enumerate(prompts):
        block[r, pad[r] :] = p
    columns = np.arange(longest)[None]
    batched = Decoder(model, VOCAB, longest + 12, rows)
    out = batched.feed(block, columns >= pad[:, None], np.maximum(columns - pad[:, None], 0))
    tokens = [list(p) for p in prompts]
    got = [[out[r, -1]] for r in range(rows)]
    for step in range(12):
        live = np.array([True, True, step < 3])
        column = np.array([int(rng.integers(0, 40)) if live[r] else VOCAB.pad for r in range(3)])
        for r in np.flatnonzero(live).tolist():
            tokens[r].append(int(column[r]))
        positions = np.array([len(t) - 1 for t in tokens])[:, None]
        out = batched.feed(column[:, None], live[:, None], positions)
        for r in np.flatnonzero(live).tolist():
            got[r].append(out[r, -1])
    for r in range(rows):
        alone = Decoder(model, VOCAB, longest + 12)
        want = [alone.feed(prompts[r])[-1]]
        want += [alone.feed([t])[-1] for t in tokens[r][len(prompts[r]) :]]
        np.testing.assert_allclose(np.stack(got[r]), np.stack(want), atol=2e-5, rtol=1e-5)
