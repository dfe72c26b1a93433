"""Auxiliary routers end to end: the post-hoc stage loads and freezes a finished run and learns
its routers' decisions; joint training leaves the main model's update unchanged; the evaluate
and generate commands run in-process on the result."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from moma_jax import analysis, registry, sampling
from moma_jax.commands import evaluate, generate, hints
from moma_jax.commands.cli import main as train_main
from moma_jax.config import ModelConfig, SparseConfig
from moma_jax.model import aux_router, kinds
from moma_jax.sharding import make_mesh
from moma_jax.train.state import init_state, is_aux_path, make_optimizer
from moma_jax.train.step import make_train_step

BASE_STEPS, AUX_STEPS = 60, 80


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """A moma_4t4i_tiny run, then its post-hoc aux-router stage."""
    root = tmp_path_factory.mktemp("aux")
    base, aux = root / "base", root / "aux"
    steps = ["--steps", str(BASE_STEPS), "--set", "run.eval_every=1000"]
    assert train_main(["--exp", "moma_4t4i_tiny", "--workdir", str(base), *steps]) == 0
    args = ["--exp", "moma_4t4i_aux_tiny", "--workdir", str(aux), "--init-from", str(base)]
    assert train_main([*args, "--steps", str(AUX_STEPS), "--set", "run.eval_every=40"]) == 0
    return base, aux


def test_aux_stage_loads_and_freezes_the_model(runs):
    base, aux = runs
    base_loss = _records(base)[-1]["eval_loss"]
    evals = [r for r in _records(aux) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 40, 80]
    for r in evals:  # every main parameter loaded unchanged and never updated
        assert r["eval_loss"] == pytest.approx(base_loss, rel=1e-6)
        assert r["grad_norm" if "grad_norm" in r else "eval_loss"] is not None
    trained = [r for r in _records(aux) if "grad_norm" in r]
    assert all(r["grad_norm"] == 0.0 and r["aux_grad_norm"] > 0 for r in trained)
    assert evals[0]["tokens"] == BASE_STEPS * 16 * 256  # counting from the source run


def test_aux_routers_learn_the_training_routers(runs):
    _, aux = runs
    records = [r for r in _records(aux) if "moe/text/aux_bce" in r]
    for group in ("text", "image"):
        assert records[-1][f"moe/{group}/aux_bce"] < 0.8 * records[0][f"moe/{group}/aux_bce"]
    last = _records(aux)[-1]
    per_layer = {k: v for k, v in last.items() if k.endswith("aux_balanced_accuracy")}
    per_layer = {k: v for k, v in per_layer.items() if k.startswith("eval_layer_")}
    assert len(per_layer) == 4 * 2  # every layer, both groups
    # Chance is 0.5. The weakest layer's value moves with the float rounding of this 40 + 40
    # step run: 0.888 (layer 0, image) once the layer scan was unrolled, >= 0.9 before.
    assert min(per_layer.values()) >= 0.85, per_layer
    assert np.mean(list(per_layer.values())) >= 0.9, per_layer


def test_an_aux_stage_needs_a_finished_run(tmp_path, capsys):
    rc = train_main(["--exp", "moma_4t4i_aux_tiny", "--workdir", str(tmp_path / "x")])
    assert rc == 2 and "--init-from" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_causal_refusal_names_experiments_and_the_command_adds_its_line():
    """The library names the experiments that train the missing aux routers; only the command
    (commands/hints.py) knows the command line."""
    with pytest.raises(aux_router.NoAuxRoutersError) as refused:
        kinds.require_for_causal(registry.get("moma_4t4i_tiny"), "runs/base")
    assert "moma_4t4i_aux_tiny" in str(refused.value) and "scripts/" not in str(refused.value)
    assert hints.train_aux_routers(refused.value) == (
        "train them: python scripts/train.py --exp moma_4t4i_aux_tiny --init-from runs/base "
        "(or train moma_4t4i_joint_aux_tiny from scratch)"
    )


def test_evaluate_both_ways(runs, capsys):
    base, aux = runs
    reports = {}
    for routing in ("teacher_forced", "causal"):
        assert evaluate.main(["--workdir", str(aux), "--routing", routing, "--json"]) == 0
        reports[routing] = json.loads(capsys.readouterr().out)
    teacher, causal = reports["teacher_forced"], reports["causal"]
    assert teacher["loss"] == pytest.approx(_records(aux)[-1]["eval_loss"], rel=1e-4)
    assert causal["loss"] == pytest.approx(_records(aux)[-1]["eval_causal_loss"], rel=1e-4)
    assert causal["loss"] != teacher["loss"]
    tasks = causal["tasks"]
    assert tasks["text"]["tokens"] > 0 and tasks["text_to_image"]["tokens"] > 0
    assert tasks["image_to_text"]["tokens"] > 0 and tasks["interleaved"]["tokens"] == 0
    assert "eval" not in teacher and "layer_0/moe/text/aux_recall" in teacher["aux_routers"]
    # The run without aux routers cannot be evaluated causally; the message says how to fix it.
    assert evaluate.main(["--workdir", str(base), "--routing", "causal"]) == 2
    assert "moma_4t4i_aux_tiny --init-from" in capsys.readouterr().err


def test_generate_an_image_and_text(runs, tmp_path, capsys):
    base, aux = runs
    out = tmp_path / "samples"
    args = ["--workdir", str(aux), "--out", str(out), "--temperature", "0.8", "--top-k", "40"]
    assert generate.main([*args, "--tokens", "768,770", "--max-tokens", "60"]) == 0  # BOS BOI
    summary = json.loads((out / "generation.json").read_text())
    tokens = summary["tokens"]
    assert all(256 <= t < 768 for t in tokens[:49]) and tokens[49] == 771  # 49 codes, EOI
    assert summary["images"] == [str(out / "image_0.png")]
    assert Image.open(summary["images"][0]).size == (28, 28)
    assert generate.main([*args, "--prompt", "ROMEO.", "--max-tokens", "20", "--top-p", "0.9"]) == 0
    assert "20 tokens" in capsys.readouterr().out
    alone = json.loads((out / "generation.json").read_text())["tokens"]
    # Several prompts: one batch, each row in its own folder, row 0 as the prompt alone.
    batch = [*args[:2], "--out", str(tmp_path / "batch"), *args[4:], "--top-p", "0.9"]
    prompts = ["--prompt", "ROMEO.", "--prompt", "A longer second prompt"]
    assert generate.main([*batch, *prompts, "--max-tokens", "20"]) == 0
    rows = [json.loads((tmp_path / "batch" / f"sample_{r}" / "generation.json").read_text())
            for r in range(2)]  # fmt: skip
    assert rows[0]["tokens"] == alone and rows[1]["tokens"] != alone
    assert capsys.readouterr().out.count("20 tokens") == 2
    for bad, message in (
        (["--prompt", ""], "empty"),
        (["--tokens", "768,9999"], "outside the vocabulary"),
        (["--prompt", "x" * 300], "context"),
        (["--prompt", "a", "--tokens", "768"], "without --prompt"),
    ):
        assert generate.main([*args, *bad]) == 2
        assert message in capsys.readouterr().err
    assert generate.main(["--workdir", str(base), "--prompt", "x"]) == 2
    assert "auxiliary routers" in capsys.readouterr().err
    # An image prompt (any size; centre-cropped and resized) is encoded to the manifest's codes.
    picture = tmp_path / "seven.png"
    pixels = np.zeros((40, 56), np.uint8)
    pixels[8:12, 10:46] = 255
    pixels[12:34, 36:40] = 255
    Image.fromarray(pixels).save(picture)
    image_out = tmp_path / "captioned"
    image_args = ["--image", str(picture), "--prompt", "a handwritten", "--max-tokens", "6"]
    assert generate.main([*args[:2], "--out", str(image_out), *image_args]) == 0
    assert json.loads((image_out / "generation.json").read_text())["images"] == []
    assert generate.main([*args[:2], "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


def _sparse_cfg(aux: str):
    base = registry.get("moma_4t4i_tiny")
    moe = SparseConfig(group_experts=(4, 4), routing_group_tokens=64, modality_shares=(0.7, 0.3))
    model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, layer_pattern=("moe",),
                        moe=moe, aux_routers=aux)  # fmt: skip
    data = dataclasses.replace(base.data, batch_size=4, seq_len=16)
    return dataclasses.replace(base, model=model, data=data)


def _main_leaves(params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p): v for p, v in flat if not is_aux_path(p)}


def test_joint_aux_routers_leave_the_main_update_unchanged():
    rng = np.random.default_rng(0)
    batches = [
        {
            "tokens": jnp.asarray(rng.integers(0, 64, (4, 16)), jnp.int32),
            "modality": jnp.asarray(rng.integers(0, 2, (4, 16)), jnp.int32),
            "segment_ids": jnp.ones((4, 16), jnp.int32),
            "positions": jnp.tile(jnp.arange(16), (4, 1)),
        }
        for _ in range(3)
    ]
    finals = {}
    start = None
    for aux in ("joint", "none"):
        cfg = _sparse_cfg(aux)
        tx = make_optimizer(cfg.optim, aux)
        graphdef, init_fn, _, _ = init_state(cfg, tx, make_mesh(cfg.mesh))
        state = init_fn()
        if start is None:  # both start from the same main parameters
            start = _main_leaves(state.params)
        else:
            leaves, treedef = jax.tree_util.tree_flatten_with_path(state.params)
            values = [start[jax.tree_util.keystr(p)] for p, _ in leaves]
            params = jax.tree_util.tree_unflatten(treedef, values)
            state = dataclasses.replace(state, params=params, opt_state=tx.init(params))
        state = dataclasses.replace(state, step=state.step + 40)  # past warm-up
        step = jax.jit(make_train_step(graphdef, cfg, tx))
        for batch in batches:
            state, metrics = step(state, batch)
        finals[aux] = (_main_leaves(state.params), metrics)
    (joint, m_joint), (plain, m_plain) = finals["joint"], finals["none"]
    assert joint.keys() == plain.keys()
    for key in joint:
        np.testing.assert_allclose(joint[key], plain[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert m_joint["grad_norm"] == pytest.approx(float(m_plain["grad_norm"]), rel=1e-5)
    assert m_joint["aux_grad_norm"] > 0 and "moe/text/aux_bce" in m_joint


def test_posthoc_optimizer_keeps_no_moments_for_the_main_model():
    cfg = _sparse_cfg("posthoc")
    sizes = {}
    for aux in ("posthoc", "joint"):
        tx = make_optimizer(cfg.optim, aux)
        _, _, abstract, _ = init_state(cfg, tx, make_mesh(cfg.mesh))
        sizes[aux] = sum(x.size for x in jax.tree.leaves(abstract.opt_state))
    params = sum(x.size for x in jax.tree.leaves(abstract.params))
    aux_params = sum(
        v.size
        for p, v in jax.tree_util.tree_flatten_with_path(abstract.params)[0]
        if is_aux_path(p)
    )
    # Two moments per parameter (plus a few step counters); post-hoc: the aux routers' only.
    assert 0 < sizes["joint"] - 2 * params < 8
    assert 0 < sizes["posthoc"] - 2 * aux_params < 8 and aux_params < params / 4


def test_analysis_sees_the_aux_routers(runs):
    _, aux = runs
    run = analysis.load_run(aux)
    batch = analysis.heldout_batch(run)
    agreement = analysis.aux_agreement(analysis.route(run, batch), batch)
    assert sorted(agreement) == [0, 1, 2, 3]
    for groups in agreement.values():
        assert set(groups) == {"text", "image"}
        assert all(g["balanced_accuracy"] > 0.85 for g in groups.values())
    causal = analysis.route(run, batch, routing="causal")
    real = batch["segment_ids"] > 0
    for groups in causal.values():  # causal: taken exactly where the aux router says so
        for name, r in groups.items():
            mine = real & (batch["modality"] == (0 if name == "text" else 1))
            np.testing.assert_array_equal(r["taken"][mine], r["aux_score"][mine] > 0.5)
            assert not r["taken"][~mine].any()
    sample = analysis.generate(run, "ROMEO.", max_tokens=8, seed=1)
    assert len(sample["tokens"]) == 8 and isinstance(sample["text"], str)


def test_a_batch_of_prompts_samples_as_each_prompt_alone(runs):
    """`generate_batch`: row r is `generate` of prompt r with seed + r (left padding, own
    positions, own grammar and stop), for prompts of different lengths, one inside an image."""
    run = analysis.load_run(runs[1])
    model = run.model()
    prompts = [[768, 72, 105, 33], [768, 770], [768, 74, 75, 76, 77, 78, 79, 80, 81]]
    options = sampling.Sampling(temperature=0.9, top_k=40, seed=3)
    batch = sampling.generate_batch(model, run.config, prompts, 24, options)
    for r, prompt in enumerate(prompts):
        alone = sampling.generate(model, run.config, prompt, 24, dataclasses.replace(
            options, seed=options.seed + r
        ))  # fmt: skip
        assert batch[r]["tokens"] == alone["tokens"]
        np.testing.assert_allclose(batch[r]["logits"], alone["logits"], atol=2e-5, rtol=1e-5)
    assert all(256 <= t < 768 for t in batch[1]["tokens"])  # BOS BOI: image codes follow
