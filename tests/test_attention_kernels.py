"""The flash-attention kernel path (`model.attention`, model/attention.py) against XLA's
attention: Pallas's kernel run by its interpreter on the CPU (the Triton kernel itself on a
GPU), forward and gradient, on packed rows with several documents and padding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moma_jax.config import ConfigError, ModelConfig
from moma_jax.losses import loss_sums
from moma_jax.model import Transformer
from moma_jax.model.attention import attend, flash_fits, segment_causal_mask
from moma_jax.model.context import Context
from moma_jax.runtime import experiment_config
from moma_jax.train import preflight


def _segments(length: int) -> jnp.ndarray:
    """Row 0: three documents and trailing padding; row 1: one document filling the row."""
    a, b = length // 4, length // 2
    row0 = [1] * a + [2] * b + [3] * (length - a - b - 5) + [0] * 5
    return jnp.asarray([row0, [1] * length], jnp.int32)


def _positions(seg: jnp.ndarray) -> jnp.ndarray:
    seg_np = np.asarray(seg)
    pos = np.zeros_like(seg_np)
    for i in range(1, seg_np.shape[1]):
        same = seg_np[:, i] == seg_np[:, i - 1]
        pos[:, i] = np.where(same, pos[:, i - 1] + 1, 0)
    return jnp.asarray(pos)


def _ctx(seg: jnp.ndarray) -> Context:
    return Context(
        positions=_positions(seg),
        segment_ids=seg,
        modality=jnp.zeros_like(seg),
        attn_mask=segment_causal_mask(seg),
    )


@pytest.mark.parametrize("length", [64, 256])  # one tile; two forward tiles, eight backward
def test_kernel_equals_xla_attention_forward_and_gradient(length):
    seg = _segments(length)
    ctx = _ctx(seg)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (2, length, 2, 16)) for kk in keys[:3])
    probe = jax.random.normal(keys[3], (2, length, 2, 16))

    def run(impl):
        def f(q, k, v):
            return jnp.sum(attend(q, k, v, ctx, None, 10_000.0, impl) * probe)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (ref, ref_grads), (got, got_grads) = run("xla"), run("pallas_interpret")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(got_grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, z_loss_weight=1e-4)


@pytest.mark.parametrize("pattern", [("dense",), ("mot",), ("mod_dense", "dense")])
def test_model_with_the_kernel_equals_the_model_with_xla(pattern):
    """Logits and parameter gradients of a model whose every attention runs the kernel (MoT's
    untied projections; a Mixture-of-Depths block's gathered tokens: 32 of the 128, whose
    length fits the kernel's tiles) equal those of the XLA path."""
    seg = _segments(64)
    batch = {
        "tokens": jax.random.randint(jax.random.key(1), seg.shape, 0, CFG.vocab_size),
        "segment_ids": seg,
        "positions": _positions(seg),
        "modality": (jnp.arange(64)[None] % 3 == 0).astype(jnp.int32).repeat(2, 0),
    }

    def run(impl):
        moe = dataclasses.replace(CFG.moe, routing_group_tokens=128)  # the batch: one group
        cfg = dataclasses.replace(CFG, layer_pattern=pattern, attention=impl, moe=moe)
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(
                batch["tokens"], batch["segment_ids"], batch["positions"], batch["modality"]
            )
            return loss_sums(logits, batch, 0.0)["ce"], logits

        fn = jax.value_and_grad(loss, has_aux=True)
        kernels = str(jax.make_jaxpr(fn)(params)).count("pallas_call")
        assert kernels >= (CFG.n_layers if impl != "xla" else 0) and (impl != "xla" or not kernels)
        return jax.jit(fn)(params)

    ((_, ref_logits), ref_grads), ((_, got_logits), got_grads) = run("xla"), run("pallas_interpret")
    np.testing.assert_allclose(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), got_grads, ref_grads
    )


def test_lengths_the_tiles_do_not_divide_take_the_xla_path():
    assert flash_fits(64) and flash_fits(256) and flash_fits(16) and flash_fits(384)
    assert not flash_fits(40) and not flash_fits(200)  # 200 % 128, a MoD layer's 0.25 x 800
    # Triton's tiles are powers of two of at least 16 (these lower on CPU, fail on a GPU).
    assert not flash_fits(96) and not flash_fits(24) and not flash_fits(8)
    seg = _segments(40)
    ctx = _ctx(seg)
    q = jax.random.normal(jax.random.key(0), (2, 40, 2, 16))
    np.testing.assert_array_equal(
        attend(q, q, q, ctx, None, 10_000.0, "pallas_interpret"),
        attend(q, q, q, ctx, None, 10_000.0, "xla"),
    )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the check of a machine without GPU")
def test_the_triton_kernel_off_a_gpu_is_refused_before_training():
    cfg = experiment_config("dense_tiny", ["model.attention=pallas"])
    with pytest.raises(ConfigError, match="needs a GPU .* model.attention=xla"):
        preflight.check(cfg)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Triton kernel needs a GPU")
def test_the_triton_kernel_equals_xla_attention_on_the_gpu():
    seg = _segments(256)
    ctx = _ctx(seg)
    q = jax.random.normal(jax.random.key(0), (2, 256, 2, 64))
    got = jax.jit(lambda q: attend(q, q, q, ctx, None, 10_000.0, "pallas"))(q)
    ref = jax.jit(lambda q: attend(q, q, q, ctx, None, 10_000.0, "xla"))(q)
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)  # TF32 matmuls on the GPU


def test_a_run_trained_with_the_kernel_reads_with_xla_off_a_gpu(tmp_path, capsys):
    """evaluate, generate, compare and the notebook open runs through `analysis.load_run`: a run
    trained with the GPU kernel is read with the XLA attention here, saying so."""
    from moma_jax.analysis import load_run
    from moma_jax.train.workdir import Workdir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Workdir(run_dir).write_config(experiment_config("dense_tiny", ["model.attention=pallas"]))
    run = load_run(run_dir)
    if jax.default_backend() == "gpu":
        assert run.config.model.attention == "pallas"
    else:
        assert run.config.model.attention == "xla"
        assert "reading it with the XLA attention" in capsys.readouterr().err
