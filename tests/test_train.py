"""End-to-end training through the CLI on the bundled real data: loss falls, resume is exact,
workdirs refuse foreign configs, and bad command lines end with short messages."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_args import small

from moma_jax import registry
from moma_jax.commands.cli import main
from moma_jax.train.metrics import read_jsonl

# A smaller dense_tiny so that the end-to-end tests take seconds.
SMALL = small(
    "model.d_model=64",
    "optim.warmup_steps=4",
    "run.log_every=1",
    "run.eval_every=10",
    "run.eval_batches=2",
    "run.checkpoint_every=5",
)


def run(workdir, steps, *extra):
    return main(
        ["--exp", "dense_tiny", "--workdir", str(workdir), "--steps", str(steps), *SMALL, *extra]
    )


def restore_params(workdir, step):
    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    return ocp.PyTreeCheckpointer().restore(path)["params"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("straight")
    assert run(workdir, 20) == 0
    return workdir


def test_workdir_holds_config_metrics_events_and_checkpoints(straight_run):
    saved = json.loads((straight_run / "config.json").read_text())
    assert saved["name"] == "dense_tiny" and saved["model"]["d_model"] == 64
    assert list((straight_run / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(
        int(p.name) for p in (straight_run / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps == [10, 15, 20]  # keep_last=3
    rows = read_jsonl(straight_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(21))
    for key in ("loss", "loss_text", "loss_image", "loss_total", "z_loss", "tokens", "flops"):
        assert key in rows[5], key
    assert rows[5]["tokens"] == 5 * 8 * 128 and rows[10]["flops"] == 2 * rows[5]["flops"]
    assert rows[5]["loss_total"] > rows[5]["loss"]  # z-loss is part of the objective


def test_loss_falls_on_real_data(straight_run):
    rows = read_jsonl(straight_run / "metrics.jsonl")
    start, end = rows[0], rows[-1]
    assert start["eval_loss"] == pytest.approx(np.log(1024), rel=0.1)  # uniform at init
    for key in ("eval_loss", "eval_loss_text", "eval_loss_image"):
        assert end[key] < start[key] - 1.0, (key, start[key], end[key])
    assert np.mean([r["loss"] for r in rows[-3:]]) < rows[1]["loss"] - 1.0


def test_killed_and_resumed_run_is_bitwise_identical(straight_run, tmp_path):
    assert run(tmp_path, 7) == 0
    assert run(tmp_path, 20) == 0  # resumes from step 7
    straight = read_jsonl(straight_run / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(21))  # each step once
    for a, b in zip(straight, resumed, strict=True):
        assert a.get("loss") == b.get("loss"), a["step"]
        if "eval_loss" in a and "eval_loss" in b:  # the interrupted run also evaluated at step 7
            assert a["eval_loss"] == b["eval_loss"], a["step"]
    jax.tree.map(
        np.testing.assert_array_equal,
        restore_params(straight_run, 20),
        restore_params(tmp_path, 20),
    )


def test_resume_refuses_changed_run_keys(straight_run, capsys):
    assert run(straight_run, 20, "--set", "optim.peak_lr=0.01") == 2
    assert "optim.peak_lr: 0.003 -> 0.01" in capsys.readouterr().err
    # Logging cadence may change; the run is complete, so nothing is trained.
    assert run(straight_run, 20, "--set", "run.log_every=5") == 0


def test_workdir_of_another_experiment_is_refused(straight_run, capsys):
    code = main(["--exp", "dense_90m", "--workdir", str(straight_run), "--steps", "1"])
    assert code == 2 and "holds a run of experiment 'dense_tiny'" in capsys.readouterr().err


def test_bad_command_lines_end_with_short_messages(tmp_path, capsys):
    assert main(["--exp", "dense_tinny"]) == 2
    assert "Did you mean: dense_tiny" in capsys.readouterr().err
    assert main(["--exp", "dense_tiny", "--set", "model.d_mdl=3"]) == 2
    assert "did you mean model.d_model" in capsys.readouterr().err
    assert main(["--exp", "dense_tiny", "--set", "model.n_heads=5"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert (
        main(
            [
                "--exp",
                "dense_tiny",
                "--workdir",
                str(tmp_path),
                "--set",
                "data.path=/nonexistent/data",
            ]
        )
        == 2
    )
    assert "/nonexistent/data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--exp", "dense_tiny", "--steps", "many"])
    assert e.value.code == 2
    assert not any(tmp_path.iterdir())  # nothing was written


def test_list_shows_every_experiment(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in registry.names())
