"""Mixture of Tokens (`model/mixture_of_tokens.py`, layer kind `motok`) against two independent
references: a NumPy loop written from the paper's equations (Antoniak et al. 2023, arXiv
2310.15961, Sec. 3: per group and expert, softmax mixing weights over the group, one mixed token
per expert, its output sent back by the same weights), and a NumPy transcription of
llm-random's forward (below). Also: gradients, no leak along the sequence, the temperature-0
and group-of-one limits, cached decoding at the group of one, FLOPs, config and evaluation."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_args import small
from flax import nnx

from moma_jax.commands.cli import main
from moma_jax.commands.describe import describe
from moma_jax.commands.evaluate import main as evaluate_main
from moma_jax.config import ConfigError, ModelConfig, TokenMixConfig
from moma_jax.data import Vocab
from moma_jax.model import Transformer, kinds
from moma_jax.model.context import Context
from moma_jax.model.mixture_of_tokens import MixtureOfTokens
from moma_jax.runtime import experiment_config
from moma_jax.sampling import Decoder

D, F, E, G = 8, 6, 3, 2
W = ("w_gate_ExDxF", "w_up_ExDxF", "w_down_ExFxD")


def _cfg(group_rows=G, temperature=1.0, **model) -> ModelConfig:
    motok = TokenMixConfig(
        experts=E, group_rows=group_rows, expert_hidden=F, temperature=temperature
    )
    return ModelConfig(
        **{"vocab_size": 48, "d_model": D, "n_layers": 1, "n_heads": 2, "motok": motok, **model}
    )


def _layer(seed=0, **cfg) -> MixtureOfTokens:
    """A layer with weights large enough that the mixing weights are far from uniform."""
    layer = MixtureOfTokens(_cfg(**cfg), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 10)
    for name in ("router_DxE", *W):
        var = getattr(layer, name)
        var[...] = jnp.asarray(rng.normal(size=var.shape) * 0.5, jnp.float32)
    return layer


def _inputs(seed=0, rows=4, length=5, image_share=0.3, padding=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, length, D)).astype(np.float32)
    modality = (rng.random((rows, length)) < image_share).astype(np.int32)
    segment = np.ones((rows, length), np.int32)
    if padding:  # a padded row end, and one position where a whole group is padding
        segment[1, -2:] = 0
        segment[2:4, -1] = 0
    return x, modality, segment


def _run(layer, x, modality, segment, causal=False):
    """(y, aux) of the layer, jitted (it reads no positions)."""
    return _forward(layer, jnp.asarray(x), jnp.asarray(modality), jnp.asarray(segment), causal)


def _apply(layer, x, modality, segment, causal=False):
    return layer(x, Context(segment, segment, modality, causal=causal))


_forward = nnx.jit(_apply, static_argnums=4)


def _weights(layer) -> dict[str, np.ndarray]:
    return {n: np.asarray(getattr(layer, n)[...], np.float64) for n in ("router_DxE", *W)}


def _swiglu(p, e):
    def expert(m):
        gate, up = m @ p["w_gate_ExDxF"][e], m @ p["w_up_ExDxF"][e]
        return (gate / (1 + np.exp(-gate)) * up) @ p["w_down_ExFxD"][e]

    return expert


def _relu(p, e):
    return lambda m: np.maximum(m @ p["w_up_ExDxF"][e], 0) @ p["w_down_ExFxD"][e]


def paper_reference(x, segment, p, group, temperature, expert=_swiglu):
    """NumPy loops over groups, positions and experts, from the paper's equations: for the real
    tokens x_1..x_n at one position of one group, w_i = softmax_i(x_i . r_e / tau), m_e =
    sum_i w_i x_i, and token i adds w_i E_e(m_e). Padding takes no part."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for k in range(x.shape[0] // group):
        rows = range(k * group, (k + 1) * group)
        for pos in range(x.shape[1]):
            real = [r for r in rows if segment[r, pos] > 0]
            if not real:
                continue
            tokens = np.stack([x[r, pos] for r in real])
            for e in range(p["router_DxE"].shape[1]):
                s = tokens @ p["router_DxE"][:, e]
                if temperature == 0:
                    w = np.eye(len(real))[np.argmax(s)]
                else:
                    w = np.exp((s - s.max()) / temperature)
                    w /= w.sum()
                y = expert(p, e)(w @ tokens)
                for i, r in enumerate(real):
                    out[r, pos] += w[i] * y
    return out


@pytest.mark.parametrize("image_share", [0.0, 0.8])  # text only, image heavy
def test_forward_matches_the_paper_equations(image_share):
    layer = _layer()
    x, modality, segment = _inputs(image_share=image_share)
    y, aux = _run(layer, x, modality, segment)
    want = paper_reference(x, segment, _weights(layer), G, 1.0)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(y)[segment == 0] == 0)
    assert 0 < float(aux["metrics"]["motok/weight_entropy"]) < 1
    # Modality-blind by design (the module docstring says why): relabelling changes nothing.
    y_flip = _run(layer, x, 1 - modality, segment)[0]
    np.testing.assert_array_equal(y, y_flip)


def test_gradient_matches_a_plain_jax_loop_and_finite_differences():
    """jax.grad of the layer equals jax.grad of the paper's loops written in jnp; one
    directional derivative also matches float64 finite differences of the NumPy reference."""
    layer = _layer(seed=1)
    x, modality, segment = _inputs(seed=1, length=3)
    graphdef, params = nnx.split(layer)

    def loop(p, x):  # the paper's loops in jnp, differentiable in the weights and x
        out = [[jnp.zeros(D) for _ in range(x.shape[1])] for _ in range(x.shape[0])]
        for k in range(x.shape[0] // G):
            for pos in range(x.shape[1]):
                real = [r for r in range(k * G, (k + 1) * G) if segment[r, pos] > 0]
                if not real:
                    continue
                tokens = jnp.stack([x[r, pos] for r in real])
                for e in range(E):
                    w = jax.nn.softmax(tokens @ p["router_DxE"][:, e])
                    m = w @ tokens
                    g, u = m @ p["w_gate_ExDxF"][e], m @ p["w_up_ExDxF"][e]
                    y = (jax.nn.silu(g) * u) @ p["w_down_ExFxD"][e]
                    for i, r in enumerate(real):
                        out[r][pos] = out[r][pos] + w[i] * y
        return jnp.stack([jnp.stack(row) for row in out])

    def layer_loss(params, x):
        seg, mod = jnp.asarray(segment), jnp.asarray(modality)
        y = _apply(nnx.merge(graphdef, params), x, mod, seg)[0]
        return jnp.sum(jnp.sin(y))

    got_p, got_x = jax.jit(jax.grad(layer_loss, argnums=(0, 1)))(params, jnp.asarray(x))
    ref = {n: jnp.asarray(getattr(layer, n)[...]) for n in ("router_DxE", *W)}
    want_p, want_x = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(loop(p, x))), argnums=(0, 1)))(
        ref, jnp.asarray(x)
    )
    for name in ref:
        np.testing.assert_allclose(got_p[name][...], want_p[name], rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(got_x, want_x, rtol=2e-4, atol=1e-5)
    assert np.abs(np.asarray(got_p["router_DxE"][...])).max() > 1e-3  # the router learns

    p64, rng, h = _weights(layer), np.random.default_rng(2), 1e-6
    direction = {n: rng.normal(size=v.shape) for n, v in p64.items()}

    def f(t):
        p = {n: p64[n] + t * direction[n] for n in p64}
        return np.sum(np.sin(paper_reference(x, segment, p, G, 1.0)))

    numeric = (f(h) - f(-h)) / (2 * h)
    analytic = sum(float(np.sum(np.asarray(got_p[n][...]) * direction[n])) for n in p64)
    assert analytic == pytest.approx(numeric, rel=1e-3)


def llm_random_forward(x_BxSxD, controller, expert, group_size, original_group_size, temp):
    """NumPy transcription of llm-random's `ContinuousMoeBaseClass.forward` with
    sparsity_dim=0 (tokens of different rows at one position) and group_size < batch, the
    path `manygroups_merge_map_emit` takes: llm-random/llm-random,
    research/conditional/moe_layers/continuous_moe.py (commit c8bef8f5), lines 53-61
    (forward, the group_size / original_group_size rescale), 74-76 (rearrange: permute to
    [S, B, d]), 88-98 (controller logits on x.view(S, B/g, g, d), stable softmax over the group
    axis -2 at the temperature; merge = emit weights, lines 103-104), 110-135 (merge with the
    transposed weights, lin1 / relu / lin2 per expert via bmm, emit) and 74-76 of
    reshape_into_original (permute(2, 0, 1)). `expert(e, X)` stands for lines 118-121 (lin1,
    relu, lin2 of expert e on rows X): ReLU as there, or the layer's SwiGLU."""
    x = np.transpose(x_BxSxD, (1, 0, 2))  # rearrange_for_grouping, sparsity_dim 0
    s, b, d = x.shape
    n_experts = controller.shape[1]
    logits = x.reshape(s, -1, group_size, d) @ controller  # [S, B/g, g, E]
    z = logits / temp
    z = np.exp(z - z.max(axis=-2, keepdims=True))
    merge = emit = z / z.sum(axis=-2, keepdims=True)
    x = np.swapaxes(merge, -1, -2) @ x.reshape(s, -1, group_size, d)  # [S, B/g, E, d]
    x = np.transpose(x.reshape(-1, n_experts, d), (1, 0, 2))  # [E, S*B/g, d]
    x = np.stack([expert(e, x[e]) for e in range(n_experts)])  # lines 118-121
    x = emit @ np.transpose(x.reshape(n_experts, s, -1, d), (1, 2, 0, 3))  # [S, B/g, g, d]
    x = np.swapaxes(x.reshape(s, -1, d), 1, 2)  # [S, d, B]
    x = np.transpose(x, (2, 0, 1))  # reshape_into_original: [B, S, d]
    return x * (group_size / original_group_size)


def test_forward_matches_a_transcription_of_llm_random():
    layer = _layer(seed=3)
    x, modality, segment = _inputs(seed=3, rows=6, padding=False)
    p = _weights(layer)

    def swiglu(e, m):
        return np.stack([_swiglu(p, e)(row) for row in m])

    def relu(e, m):
        return np.stack([_relu(p, e)(row) for row in m])

    ref = llm_random_forward(x, p["router_DxE"], swiglu, G, G, 1.0)
    np.testing.assert_allclose(_run(layer, x, modality, segment)[0], ref, rtol=1e-4, atol=1e-5)
    # With the reference's own ReLU experts, the transcription is the paper's equations too.
    np.testing.assert_allclose(
        llm_random_forward(x, p["router_DxE"], relu, G, G, 0.7),
        paper_reference(x, segment, p, G, 0.7, expert=_relu),
        rtol=1e-10,
    )
    # Its group size changed to 1 for inference (rescaled by 1 / G) is our causal mode.
    ref_one = llm_random_forward(x, p["router_DxE"], swiglu, 1, G, 1.0)
    got_one = _run(layer, x, modality, segment, causal=True)[0]
    np.testing.assert_allclose(got_one, ref_one, rtol=1e-4, atol=1e-5)


def test_nothing_moves_along_the_sequence_but_rows_of_a_group_mix():
    layer = _layer()
    x, modality, segment = _inputs(rows=4, length=6, padding=False)
    t = 2
    changed = x.copy()
    changed[:, t + 1 :] = np.random.default_rng(9).normal(size=changed[:, t + 1 :].shape)
    a, b = (np.asarray(_run(layer, v, modality, segment)[0]) for v in (x, changed))
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert np.abs(a[:, t + 1 :] - b[:, t + 1 :]).max() > 1e-3
    # Row 0 changed: its group's other row (1) moves, the other group (rows 2, 3) does not.
    other = x.copy()
    other[0] += 1.0
    c = np.asarray(_run(layer, other, modality, segment)[0])
    assert np.abs(c[1] - a[1]).max() > 1e-4
    np.testing.assert_array_equal(c[2:], a[2:])
    # The group of one: no row sees another.
    a1, c1 = (np.asarray(_run(layer, v, modality, segment, causal=True)[0]) for v in (x, other))
    np.testing.assert_array_equal(a1[1:], c1[1:])


def test_temperature_zero_is_the_limit_one_token_per_expert():
    """At tau -> 0 the softmax becomes each expert's top token of the group, weight 1: only
    that token receives the expert's output, computed on the token itself."""
    x, modality, segment = _inputs(seed=4)
    hard, soft = _layer(seed=4, temperature=0.0), _layer(seed=4, temperature=1e-4)
    got = np.asarray(_run(hard, x, modality, segment)[0])
    np.testing.assert_allclose(got, np.asarray(_run(soft, x, modality, segment)[0]), atol=1e-4)
    p = _weights(hard)
    np.testing.assert_allclose(got, paper_reference(x, segment, p, G, 0.0), rtol=1e-4, atol=1e-5)
    want = np.zeros_like(got, dtype=np.float64)
    for k in range(x.shape[0] // G):
        for pos in range(x.shape[1]):
            real = [r for r in range(k * G, (k + 1) * G) if segment[r, pos] > 0]
            for e in range(E):
                if real:
                    top = real[int(np.argmax([x[r, pos] @ p["router_DxE"][:, e] for r in real]))]
                    want[top, pos] += _swiglu(p, e)(x[top, pos].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_the_group_of_one_sums_every_expert_over_g_and_agrees_at_uniform_weights():
    layer = _layer(seed=5)
    x, modality, segment = _inputs(seed=5)
    p = _weights(layer)
    got = np.asarray(_run(layer, x, modality, segment, causal=True)[0])
    want = sum(np.apply_along_axis(_swiglu(p, e), -1, x.astype(np.float64)) for e in range(E))
    np.testing.assert_allclose(got, want * (segment > 0)[..., None] / G, rtol=1e-4, atol=1e-5)
    # Every row of a group the same: uniform weights, and the two modes give the same output.
    same = np.repeat(x[::G], G, axis=0)
    full = np.ones_like(segment)
    np.testing.assert_allclose(
        _run(layer, same, modality, full)[0], _run(layer, same, modality, full, causal=True)[0],
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_cached_decoding_equals_the_full_forward_at_the_group_of_one():
    vocab = Vocab(n_text=24, n_image_codes=16)
    model = Transformer(_cfg(d_model=32, n_layers=2, layer_pattern=("motok",)), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompt = [40, 1, 2, 3, 42, 24, 25, 26, 43, 5]
    decoder = Decoder(model, vocab, 32)
    tokens, rows = list(prompt), [decoder.feed(prompt)]
    for _ in range(12):
        p = np.exp(rows[-1][-1][:40] - rows[-1][-1][:40].max())
        tokens.append(int(rng.choice(40, p=p / p.sum())))
        rows.append(decoder.feed(tokens[-1:]))
    cached = np.concatenate(rows)[:-1]
    ids = np.asarray([tokens[:-1]])
    full = model(
        jnp.asarray(ids), jnp.ones_like(ids), jnp.arange(ids.shape[1])[None],
        jnp.asarray(vocab.modality_of(ids), jnp.int32), routing="causal",
    )[0][0]  # fmt: skip
    np.testing.assert_allclose(cached, np.asarray(full), atol=2e-5, rtol=1e-5)


def test_flop_matched_to_dense_and_no_aux_routers():
    dense = describe(experiment_config("dense_tiny"))
    cfg = experiment_config("mixture_of_tokens_tiny")
    info = describe(cfg)
    ratio = info["flops_per_token_ideal"] / dense["flops_per_token_ideal"]
    assert 1 <= ratio < 1.05, ratio
    assert info["flops_per_token_executed"] == info["flops_per_token_ideal"]
    (row,) = info["layer_plan"]["unit"]
    assert (row["kind"], row["experts"], row["group_rows"]) == ("motok", 8, 8)
    assert row["causal_ffn_flops"] == 8 * 6 * 128 * row["expert_hidden"]
    assert not kinds.needs_aux_routers(cfg.model)
    with pytest.raises(ConfigError, match="group_rows=8"):
        experiment_config("mixture_of_tokens_tiny", ["data.batch_size=12"])
    with pytest.raises(ConfigError, match="temperature"):
        experiment_config("mixture_of_tokens_tiny", ["model.motok.temperature=-1"])


def test_trains_and_evaluates_both_ways(tmp_path, data_dir, capsys):
    args = ["--exp", "mixture_of_tokens_tiny", "--workdir", str(tmp_path), "--steps", "2"]
    assert main([*args, *small("model.motok.group_rows=4", "run.log_every=1")]) == 0
    capsys.readouterr()
    losses = {}
    for routing in ("teacher_forced", "causal"):
        argv = ["--workdir", str(tmp_path), "--batches", "1", "--routing", routing, "--json"]
        assert evaluate_main([*argv, "--leak"]) == 0
        report = json.loads(capsys.readouterr().out)
        losses[routing] = report["loss"]
        assert math.isfinite(report["loss"])
        assert report["leak"]["max_abs_logprob_change"] == 0.0  # nothing moves along the rows
    assert losses["teacher_forced"] != losses["causal"]  # mixing on, mixing off
