"""compare.py end to end: a 2-experiment, 1-seed suite at the test shape trains, a killed suite
resumes where it stopped, and the report holds eta for every modality."""

import json

import pytest
from cli_args import SMALL_KEYS

import moma_jax.train
from moma_jax.commands.compare import main
from moma_jax.suites import SUITES, Suite, get_suite, register_suite
from moma_jax.train.faults import WorkdirLock

KEYS = (
    *SMALL_KEYS,
    "optim.total_steps=20",
    "model.moe.routing_group_tokens=1024",
    "run.log_every=1",
    "run.eval_every=5",
    "run.eval_batches=1",
    "run.checkpoint_every=10",
)


@pytest.fixture
def pair():
    exps = ("dense_tiny", "moma_1t1i_tiny", "moe_8x_tiny", "moe_8x_joint_aux_tiny")
    suite = register_suite(Suite("test_pair", exps, 1, KEYS, aux_stages=True))
    yield suite
    SUITES.pop(suite.name)


def test_a_killed_suite_resumes_and_reports(pair, tmp_path, monkeypatch, capsys):
    calls = []
    real_train = moma_jax.train.train

    def train_then_die(cfg, workdir, *a):
        calls.append(cfg.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the suite is killed during its second run
        return real_train(cfg, workdir, *a)

    monkeypatch.setattr(moma_jax.train, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(["--suite", "test_pair", "--root", str(tmp_path)])
    dense_metrics = tmp_path / "test_pair" / "dense_tiny" / "seed0" / "metrics.jsonl"
    finished = dense_metrics.read_text()
    monkeypatch.setattr(moma_jax.train, "train", real_train)
    assert main(["--suite", "test_pair", "--root", str(tmp_path)]) == 0
    assert dense_metrics.read_text() == finished  # the finished run was not trained again
    rep = json.loads((tmp_path / "test_pair" / "report.json").read_text())
    dense = rep["experiments"]["dense_tiny"]
    for m in ("overall", "text", "image"):
        assert dense[m]["eta_heldout"]["mean"] == pytest.approx(1.0)  # dense against itself
        other = rep["experiments"]["moma_1t1i_tiny"][m]
        assert other["eta_heldout"]["n"] == 1
        assert other["final_heldout_loss"]["mean"] > 0
    text = (tmp_path / "test_pair" / "report.md").read_text()
    assert "| moma_1t1i_tiny | image |" in text
    assert (tmp_path / "test_pair" / "loss_vs_flops.png").stat().st_size > 1000
    assert (tmp_path / "test_pair" / "eta.png").stat().st_size > 1000
    curves = rep["curves"]["moma_1t1i_tiny/seed0"]
    assert set(curves["layer_load"]) == {"text", "image"}  # one expert each: load 1 per layer
    assert curves["layer_load"]["image"] == [[1.0]] * 2
    assert (tmp_path / "test_pair" / "expert_load.png").stat().st_size > 1000
    assert "report: " in capsys.readouterr().out
    # Causal losses: the same numbers without a group-ranking router; moe_8x through its
    # post-hoc aux-router stage, trained after it (with the suite's keys: 20 steps).
    assert (tmp_path / "test_pair" / "moe_8x_aux_tiny" / "seed0" / "checkpoints" / "20").is_dir()
    causal = {e: rep["experiments"][e]["causal"] for e in rep["experiments"]}
    assert causal["dense_tiny"]["source"] == "same"
    assert causal["dense_tiny"]["text"]["final"] == dense["text"]["final_heldout_loss"]
    assert causal["moe_8x_tiny"]["source"] == "posthoc"
    assert causal["moe_8x_tiny"]["image"]["final"]["mean"] > 0
    joint = causal["moe_8x_joint_aux_tiny"]  # its own causal curve: a causal eta per modality
    assert joint["source"] == "joint" and joint["text"]["eta"]["n"] == 1
    assert joint["overall"]["final"]["mean"] > 0
    tasks = rep["experiments"]["moe_8x_tiny"]["tasks"]
    assert tasks["routing"] == "causal" and tasks["interleaved"] is None
    assert any(tasks[t] for t in ("text", "text_to_image", "image_to_text"))
    assert rep["data"]["epochs"] == pytest.approx(20 * 8 * 128 / rep["data"]["train_split_tokens"])
    assert "| moe_8x_tiny | posthoc |" in text and "| dense_tiny | causal |" in text

    # One compare.py per --root; a torn last metrics line is skipped with a warning.
    report_only = ["--suite", "test_pair", "--root", str(tmp_path), "--report-only"]
    with WorkdirLock(tmp_path, flag="--root"):
        capsys.readouterr()
        assert main(report_only) == 2
        assert f"--root {tmp_path} is in use by pid" in capsys.readouterr().err
    with open(dense_metrics, "a") as f:
        f.write('{"step": 99, "lo')
    assert main(report_only) == 0
    assert "skipping a torn last line" in capsys.readouterr().err


def test_unknown_suite_lists_the_close_ones():
    with pytest.raises(Exception, match="did you mean paper_tiny"):
        get_suite("paper_tin")
