"""The Mamba mixer and Mixture-of-Mamba (model/mamba.py, model/ssm.py) against references:

- `equations`: a sequential loop written from the Mamba paper's equations (arXiv 2312.00752,
  Algorithm 2 and Section 3.4; model/mamba.py's docstring), one token at a time, the state and
  the conv window restarting at each document; run in NumPy (forward) and in jax.numpy (its
  gradient, an independent computation: no associative scan, no masks);
- `transcription`: Weixin-Liang/Mixture-of-Mamba `MixtureOfMamba.py` (commit ca607f7) in NumPy:
  per-modality in_proj (L96-103 built, L274-306 applied: `x[modality_masks[i]]` through
  expert i, scattered back), conv1d over the row (L332-339), per-modality x_proj (L131-141,
  L351-380), the dt/B/C split and per-modality dt_proj with its bias (L168-178, L382-415),
  the scan `selective_scan_fn(..., z=z, delta_softplus=True)` (L420-430), whose semantics are
  state-spaces/mamba `selective_scan_ref` (mamba_ssm/ops/selective_scan_interface.py L127-193,
  commit e9594ce: deltaA = exp(delta A), x = deltaA x + delta B u, y = C x + D u, y silu(z)),
  and per-modality out_proj (L235-242, L444-471). It has no documents (one per row here).

Plus: a document's outputs do not depend on the other documents of its row, decoding chunk by
chunk through `RecurrentState` equals the whole row, and the FLOP-matched experiments. The
layer's tests run both paths of the scan (`model.mamba.scan`: associative and sequential).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax import registry
from moma_jax.commands.describe import describe
from moma_jax.config import ConfigError, MambaConfig, ModelConfig, SparseConfig, validate
from moma_jax.model.context import Context
from moma_jax.model.mamba import MambaMixer, RecurrentState, empty_state
from moma_jax.model.ssm import resolve_scan

CFG = ModelConfig(
    vocab_size=48, d_model=16, n_layers=1, n_heads=2, init_std=0.3,
    mamba=MambaConfig(d_state=4, expand=1.5, dt_rank=3),
    moe=SparseConfig(modality_shares=(0.5, 0.5)),
)  # fmt: skip
D, DI, DS, DR, W = 16, 24, 4, 3, 4
B, L = 2, 12
# Row 0: documents of 4, 5 and 1 tokens, then padding (segment 0); row 1: one document.
SEGMENTS = np.array([[1] * 4 + [2] * 5 + [3] + [0] * 2, [5] * 12], np.int32)


def _layer(untied: bool, seed: int = 0, scan: str = "auto") -> MambaMixer:
    cfg = dataclasses.replace(CFG, mamba=dataclasses.replace(CFG.mamba, scan=scan))
    layer = MambaMixer(cfg, rngs=nnx.Rngs(seed), untied=untied)
    # Non-trivial shared parameters (their init is constant): A, D and the conv bias random.
    rng = np.random.default_rng(seed)
    layer.a_log_DixDs[...] = jnp.asarray(np.log(rng.uniform(0.5, 4.0, (DI, DS))), jnp.float32)
    layer.d_Di[...] = jnp.asarray(rng.normal(size=DI), jnp.float32)
    return layer


def _inputs(image_share: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    modality = (rng.random((B, L)) < image_share).astype(np.int32)
    return x, modality


def _ctx(segments: np.ndarray, modality: np.ndarray, kv=None) -> Context:
    positions = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    return Context(
        positions=positions,
        segment_ids=jnp.asarray(segments),
        modality=jnp.asarray(modality),
        kv=kv,
    )


@nnx.jit
def _apply(layer: MambaMixer, x, segments, modality) -> jax.Array:
    return layer(x, _ctx(segments, modality))


@nnx.jit
def _decode(layer: MambaMixer, x, segments, modality, arrays) -> tuple[jax.Array, dict]:
    state = RecurrentState(arrays)
    return layer(x, _ctx(segments, modality, state)), state.arrays()


def _params(layer_params, xp) -> dict:
    return {k: xp.asarray(v[...]) for k, v in layer_params.items()}


def equations(xp, p: dict, x, segments: np.ndarray, modality: np.ndarray, untied: bool):
    """Sequential Mamba from the equations; each token uses its modality's projections when
    `untied`. Works on numpy (float64) or jax.numpy arrays."""

    def silu(v):
        return v / (1 + xp.exp(-v))

    def weights(name, m):
        return p[name][m] if untied else p[name]

    a = -xp.exp(p["a_log_DixDs"])
    rows = []
    for b in range(x.shape[0]):
        outs: list = []
        history: list = []
        h = None
        for t in range(x.shape[1]):
            m = int(modality[b, t])
            if t == 0 or segments[b, t] != segments[b, t - 1]:  # a new document
                h, history = xp.zeros((DI, DS)), []
            uz = x[b, t] @ weights("w_in", m).reshape(D, 2 * DI)
            u, z = uz[:DI], uz[DI:]
            history.append(u)
            conv = p["conv_b_Di"]
            for k in range(min(W, len(history))):  # k tokens back, same document only
                conv = conv + p["conv_w_WxDi"][W - 1 - k] * history[-1 - k]
            u = silu(conv)
            rbc = u @ weights("w_x", m)
            r, b_t, c_t = rbc[:DR], rbc[DR : DR + DS], rbc[DR + DS :]
            delta = xp.logaddexp(0.0, r @ weights("w_dt", m) + weights("b_dt", m))
            h = xp.exp(delta[:, None] * a) * h + (delta * u)[:, None] * b_t[None, :]
            y = h @ c_t + p["d_Di"] * u
            outs.append((y * silu(z)) @ weights("w_out", m))
        rows.append(xp.stack(outs))
    return xp.stack(rows)


def transcription(p: dict, x: np.ndarray, modality: np.ndarray) -> np.ndarray:
    """MixtureOfMamba.forward (module docstring's lines) in NumPy, one document per row. Our
    weights are stored [in, out]; torch's nn.Linear holds weight [out, in] = ours transposed."""
    n_modalities = 2
    batch, seqlen, _ = x.shape
    masks = [modality.reshape(-1) == i for i in range(n_modalities)]

    def experts(inp, name, bias=None):  # the local_experts_* loop, then the merged scatter
        merged = np.empty((inp.shape[0], p[name].shape[-1]))
        for i in range(n_modalities):
            out = inp[masks[i]] @ p[name][i]
            merged[masks[i]] = out if bias is None else out + p[bias][i]
        return merged

    def silu(v):
        return v / (1 + np.exp(-v))

    p = dict(p, w_in=p["w_in"].reshape(n_modalities, D, 2 * DI))
    xz = experts(x.reshape(-1, D), "w_in").reshape(batch, seqlen, 2 * DI).transpose(0, 2, 1)
    u, z = xz[:, :DI], xz[:, DI:]  # b d l
    padded = np.concatenate([np.zeros((batch, DI, W - 1)), u], axis=2)  # Conv1d padding W-1
    conv = p["conv_b_Di"][None, :, None] + sum(
        p["conv_w_WxDi"][k][None, :, None] * padded[:, :, k : k + seqlen] for k in range(W)
    )
    u = silu(conv)
    x_dbl = experts(u.transpose(0, 2, 1).reshape(-1, DI), "w_x")
    dt, b_m, c_m = x_dbl[:, :DR], x_dbl[:, DR : DR + DS], x_dbl[:, DR + DS :]
    dt = experts(dt, "w_dt", "b_dt").reshape(batch, seqlen, DI).transpose(0, 2, 1)
    b_m = b_m.reshape(batch, seqlen, DS).transpose(0, 2, 1)
    c_m = c_m.reshape(batch, seqlen, DS).transpose(0, 2, 1)
    # selective_scan_ref(u, delta, A, B, C, D, z, delta_bias=None, delta_softplus=True)
    delta = np.logaddexp(0.0, dt)
    a = -np.exp(p["a_log_DixDs"])
    delta_a = np.exp(np.einsum("bdl,dn->bdln", delta, a))
    delta_b_u = np.einsum("bdl,bnl,bdl->bdln", delta, b_m, u)
    state, ys = np.zeros((batch, DI, DS)), []
    for i in range(seqlen):
        state = delta_a[:, :, i] * state + delta_b_u[:, :, i]
        ys.append(np.einsum("bdn,bn->bd", state, c_m[:, :, i]))
    y = np.stack(ys, axis=2) + u * p["d_Di"][:, None]
    y = y * silu(z)
    y = y.transpose(0, 2, 1).reshape(-1, DI)
    return experts(y, "w_out").reshape(batch, seqlen, D)


# Both paths of the scan (model.mamba.scan; "auto" is one of them by backend).
SCANS = pytest.mark.parametrize("scan", ["associative", "sequential"])


@SCANS
@pytest.mark.parametrize("untied", [False, True], ids=["mamba", "mom"])
def test_forward_equals_the_equations_with_documents(untied, scan):
    layer = _layer(untied, scan=scan)
    x, modality = _inputs(0.4)
    got = _apply(layer, x, SEGMENTS, modality)
    params = _params(nnx.state(layer, nnx.Param), np)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    want = equations(np, p64, x.astype(np.float64), SEGMENTS, modality, untied)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


@SCANS
@pytest.mark.parametrize("untied", [False, True], ids=["mamba", "mom"])
def test_gradient_equals_the_equations_gradient(untied, scan):
    """d(sum(out * cotangent)) / d(every parameter, x): the layer (either scan, masked conv,
    by-modality projections) against jax.grad of the sequential loop."""
    layer = _layer(untied, scan=scan)
    graphdef, params = nnx.split(layer, nnx.Param)
    x, modality = _inputs(0.8)  # image-heavy
    cot = jnp.asarray(np.random.default_rng(1).normal(size=(B, L, D)), jnp.float32)
    ctx = _ctx(SEGMENTS, modality)

    def ours(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x, ctx) * cot)

    def reference(params, x):
        return jnp.sum(equations(jnp, _params(params, jnp), x, SEGMENTS, modality, untied) * cot)

    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, jnp.asarray(x))
    want = jax.jit(jax.grad(reference, argnums=(0, 1)))(params, jnp.asarray(x))
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        scale = float(jnp.abs(w).max()) + 1e-6
        np.testing.assert_allclose(g, w, atol=2e-5 * scale, rtol=1e-3, err_msg=str(path))


@pytest.mark.parametrize("image_share", [0.0, 0.8, 1.0], ids=["text_only", "image_heavy", "image"])
def test_mixture_of_mamba_equals_the_public_implementation(image_share):
    layer = _layer(untied=True, seed=2)
    x, modality = _inputs(image_share, seed=3)
    one_document = np.ones((B, L), np.int32)
    got = _apply(layer, x, one_document, modality)
    params = _params(nnx.state(layer, nnx.Param), np)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    want = transcription(p64, x.astype(np.float64), modality)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_an_absent_modality_gets_no_gradient_and_shared_weights_are_mamba():
    """Text-only batch: the image slices of the untied projections get exactly zero gradient;
    and with both slices equal to Mamba's weights, Mixture-of-Mamba is Mamba."""
    layer = _layer(untied=True)
    graphdef, params = nnx.split(layer, nnx.Param)
    x, modality = _inputs(0.0)
    ctx = _ctx(SEGMENTS, modality)
    loss = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(jnp.asarray(x), ctx) ** 2)))
    grads = loss(params)
    for name in ("w_in", "w_x", "w_dt", "b_dt", "w_out"):
        assert np.all(np.asarray(grads[name][...])[1] == 0), name
        assert np.any(np.asarray(grads[name][...])[0] != 0), name
    tied = _layer(untied=False)
    for name in ("w_in", "w_x", "w_dt", "b_dt", "w_out"):
        w = getattr(tied, name)[...]
        getattr(layer, name)[...] = jnp.stack([w, w])
    for name in ("conv_w_WxDi", "conv_b_Di", "a_log_DixDs", "d_Di"):
        getattr(layer, name)[...] = getattr(tied, name)[...]
    _, mixed = _inputs(0.5)
    np.testing.assert_allclose(
        np.asarray(_apply(layer, x, SEGMENTS, mixed)),
        np.asarray(_apply(tied, x, SEGMENTS, mixed)),
        atol=1e-5,
    )


@SCANS
def test_a_document_does_not_see_its_neighbours_or_the_future(scan):
    """Row 0's documents, each run alone, give the same outputs as inside the packed row; and
    changing the tokens after t changes no output at or before t."""
    layer = _layer(untied=True, scan=scan)
    x, modality = _inputs(0.5)
    packed = np.asarray(_apply(layer, x, SEGMENTS, modality))
    for doc in (1, 2, 3):  # each alone, at the same length: the row's other tokens padding
        alone, keep = np.zeros_like(SEGMENTS[:1]), SEGMENTS[:1] == doc
        alone[keep] = doc
        out = np.asarray(_apply(layer, x[:1], alone, modality[:1]))
        np.testing.assert_allclose(out[keep], packed[:1][keep], atol=1e-5)
    t = 6
    changed = x.copy()
    changed[:, t + 1 :] = np.random.default_rng(9).normal(size=changed[:, t + 1 :].shape)
    after = np.asarray(_apply(layer, changed, SEGMENTS, modality))
    np.testing.assert_array_equal(after[:, : t + 1], packed[:, : t + 1])
    assert not np.allclose(after[1, t + 1 :], packed[1, t + 1 :])


@SCANS
@pytest.mark.parametrize("untied", [False, True], ids=["mamba", "mom"])
def test_recurrent_decoding_in_chunks_equals_the_whole_row(untied, scan):
    """Chunks of 5, 1, 1, 2 and 3 tokens through one `RecurrentState` (documents start inside
    and at the edge of chunks) give the whole row's outputs."""
    layer = _layer(untied, scan=scan)
    x, modality = _inputs(0.5)
    whole = np.asarray(_apply(layer, x, SEGMENTS, modality))
    arrays, outs, start = empty_state(CFG, B), [], 0
    for size in (5, 1, 1, 2, 3):
        cols = slice(start, start + size)
        out, arrays = _decode(layer, x[:, cols], SEGMENTS[:, cols], modality[:, cols], arrays)
        outs.append(out)
        start += size
    np.testing.assert_allclose(np.concatenate(outs, axis=1), whole, atol=1e-5)


@pytest.mark.parametrize("name", ["mamba_tiny", "mom_tiny", "moe_mamba_tiny"])
def test_the_tiny_experiments_are_flop_matched_to_dense(name):
    """Ideal forward FLOPs per token within 10% of dense_tiny's (the issue's bound for the
    Mamba kinds), as describe reports them."""
    cfg = registry.get(name)
    dense = describe(registry.get("dense_tiny"))["flops_per_token_ideal"]
    share = dataclasses.replace(cfg.model.moe, modality_shares=(0.77, 0.23))
    info = describe(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=share)))
    assert abs(info["flops_per_token_ideal"] / dense - 1) < 0.10
    assert {e["kind"] for e in info["layer_plan"]["unit"]} <= {"mamba", "mom", "mamba_moe"}


@pytest.mark.parametrize(
    "mamba, problem",
    [
        (MambaConfig(d_state=0), "d_state > 0"),
        (MambaConfig(d_conv=1), "d_conv >= 2"),
        (MambaConfig(dt_min=0.2, dt_max=0.1), "dt_min <= dt_max"),
        (MambaConfig(scan="parallel"), "model.mamba.scan='parallel' is not one of"),
    ],
)
def test_a_bad_mamba_section_is_refused_naming_the_key(mamba, problem):
    cfg = registry.get("mamba_tiny")
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mamba=mamba))
    with pytest.raises(ConfigError, match=problem):
        validate(bad)


def test_auto_is_the_sequential_scan_on_cpu_and_the_associative_one_elsewhere(monkeypatch):
    assert [resolve_scan(s) for s in ("associative", "sequential")] == ["associative", "sequential"]
    for backend, path in (("cpu", "sequential"), ("gpu", "associative"), ("tpu", "associative")):
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert resolve_scan("auto") == path
