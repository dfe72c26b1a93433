"""Nothing a user owns is lost on the training side: a changed config never renames
checkpoints, a run never starts at step 0 over an earlier one (unless --restart, which moves it
aside), --init-from and the readers (evaluate, generate, analysis) leave other runs byte for
byte as they were, no checkpoint holds NaN, the data position is inside the integrity check,
and no fixed-name file is written through a planted symlink."""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from cli_args import small
from file_tree import png_header

from moma_jax import analysis
from moma_jax import data as data_lib
from moma_jax.commands import evaluate, generate
from moma_jax.commands.cli import main
from moma_jax.train import step as step_lib
from moma_jax.train.metrics import read_jsonl

KEYS = ("run.log_every=1", "run.eval_every=100", "run.eval_batches=1", "run.checkpoint_every=3")
ARGS = ["--exp", "dense_tiny", *small(*KEYS)]


def tree(path: Path) -> dict[str, str]:
    """Every entry under `path`: file contents' digest, link target, or 'dir'."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A run with checkpoints at steps 3, 6, 9."""
    workdir = tmp_path_factory.mktemp("safety") / "run"
    assert main([*ARGS, "--workdir", str(workdir), "--steps", "9"]) == 0
    return workdir


@pytest.fixture
def run_copy(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, symlinks=True)
    (copy / ".lock").unlink(missing_ok=True)
    return copy


def test_edited_config_with_matching_set_is_refused_and_nothing_renamed(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["model"]["d_model"] = 48
    (run_copy / "config.json").write_text(json.dumps(config))
    before = tree(run_copy)
    argv = [*ARGS, "--set", "model.d_model=48", "--workdir", str(run_copy), "--steps", "12"]
    for _ in range(2):  # and the second attempt does not start over at step 0
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "checkpoint step 9" in err and "model.d_model: 32 -> 48" in err, err
        assert "nothing was changed" in err
        assert tree(run_copy) == before


def test_data_prepared_again_differently_is_refused_and_nothing_renamed(
    run_copy, monkeypatch, capsys
):
    """The same data.path holding other data (prepared again with another seed): the data
    position saved with the checkpoint would resume into other records."""
    real = data_lib.load_manifest
    monkeypatch.setattr(data_lib, "load_manifest", lambda path: {**real(path), "seed": 7})
    before = tree(run_copy)
    capsys.readouterr()
    assert main([*ARGS, "--workdir", str(run_copy), "--steps", "12"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 9" in err and "trained on other data" in err and "seed" in err, err
    assert tree(run_copy) == before
    # What only records how the data was prepared (timings, input paths) is no difference.
    monkeypatch.setattr(
        data_lib, "load_manifest", lambda path: {**real(path), "prepare_seconds": 1e6}
    )
    assert main([*ARGS, "--workdir", str(run_copy), "--steps", "12"]) == 0


def test_no_fresh_start_over_an_earlier_run_unless_restart(run_copy, capsys):
    for step in ("3", "6", "9"):  # checkpoints lost, say, but the metrics are there
        shutil.move(run_copy / "checkpoints" / step, run_copy / f"kept-{step}")
    before = tree(run_copy)
    argv = [*ARGS, "--workdir", str(run_copy), "--steps", "3"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run (metrics of steps 1..9)" in err and "--restart" in err, err
    assert tree(run_copy) == before
    assert main([*argv, "--restart"]) == 0
    (moved,) = (run_copy / "previous-runs").iterdir()
    for name in ("config.json", "metrics.jsonl"):  # moved aside byte for byte, not deleted
        assert tree(moved)[name] == before[name]
    assert max(r["step"] for r in read_jsonl(run_copy / "metrics.jsonl")) == 3


def test_a_metrics_file_without_trained_steps_does_not_block_a_fresh_start(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("")  # a run that failed before its first step
    assert main([*ARGS, "--workdir", str(workdir), "--steps", "3"]) == 0


def test_every_checkpoint_damaged_is_refused_and_nothing_renamed(run_copy, capsys):
    for step in ("3", "6", "9"):
        (run_copy / "checkpoints" / step / "fingerprint" / "metadata").write_text("{")
    before = tree(run_copy)
    capsys.readouterr()
    assert main([*ARGS, "--workdir", str(run_copy), "--steps", "12"]) == 2
    err = capsys.readouterr().err
    assert "every checkpoint" in err and "nothing was renamed" in err, err
    assert tree(run_copy) == before


def test_edited_data_position_is_damage_and_the_run_resumes_before_it(run_copy, capsys):
    position = run_copy / "checkpoints" / "9" / "data" / "process_0-of-1.json"
    state = json.loads(position.read_text())
    text = json.dumps(state)
    edited = text.replace("1", "2", 1)
    assert edited != text
    position.write_text(edited)
    capsys.readouterr()
    assert main([*ARGS, "--workdir", str(run_copy), "--steps", "12"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint step 9 is damaged (its data-iterator position" in captured.err
    assert "at step 6" in captured.out
    assert (run_copy / "checkpoints" / "9.corrupt").is_dir()  # our own run: kept aside


def test_init_from_a_damaged_source_leaves_it_untouched(run_copy, tmp_path, capsys):
    (run_copy / "checkpoints" / "9" / "fingerprint" / "metadata").write_text("{}")
    before = tree(run_copy)
    target = tmp_path / "upcycled"
    argv = [*ARGS, "--workdir", str(target), "--init-from", str(run_copy), "--steps", "3"]
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "checkpoint step 9 is damaged" in captured.err
    assert f"initialised from {run_copy} at its step 6" in captured.out
    assert tree(run_copy) == before


def test_readers_create_nothing_and_verify_like_training(run_copy, tmp_path, capsys):
    before = tree(run_copy)
    assert evaluate.main(["--workdir", str(run_copy), "--batches", "1"]) == 0
    out = tmp_path / "samples"
    argv = ["--workdir", str(run_copy), "--prompt", "A", "--max-tokens", "3", "--out", str(out)]
    assert generate.main(argv) == 0
    run = analysis.load_run(run_copy)
    assert run.steps == [3, 6, 9] and len(run.history("loss")["loss"]) == 9
    assert tree(run_copy) == before

    # Damage step 9: the readers report it, skip to step 6, and still rename nothing.
    biggest = max(
        (p for p in (run_copy / "checkpoints" / "9" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(biggest.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)
    biggest.write_bytes(bytes(data))
    damaged = tree(run_copy)
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(run_copy), "--batches", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint step 9 is damaged" in captured.err
    assert json.loads(captured.out)["step"] == 6
    assert evaluate.main(["--workdir", str(run_copy), "--step", "9"]) == 2
    assert "checkpoint step 9 is damaged" in capsys.readouterr().err
    assert tree(run_copy) == damaged

    # A run with no checkpoints directory at all: the readers create none.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_copy / "config.json", bare / "config.json")
    assert evaluate.main(["--workdir", str(bare)]) == 2
    assert generate.main(["--workdir", str(bare), "--out", str(tmp_path / "s2")]) == 2
    assert sorted(p.name for p in bare.iterdir()) == ["config.json"]


def test_a_non_finite_state_is_never_checkpointed(run_copy, tmp_path, monkeypatch, capsys):
    """NaN in the parameters after step 12 while its loss stays finite (computed before
    the update): the checkpoint of step 12 is refused and the message names step 9."""
    real = step_lib.make_train_step

    def faulty(graphdef, cfg, tx):
        inner = real(graphdef, cfg, tx)

        def train_step(state, batch):
            new_state, metrics = inner(state, batch)
            poison = jnp.where(new_state.step == 12, jnp.nan, 0.0)
            params = jax.tree.map(lambda p: p + poison, new_state.params)
            return new_state.replace(params=params), metrics

        return train_step

    monkeypatch.setattr("moma_jax.train.step.make_train_step", faulty)
    capsys.readouterr()
    assert main([*ARGS, "--workdir", str(run_copy), "--steps", "12"]) == 1
    err = capsys.readouterr().err
    assert "step 12: the state holds NaN or Inf" in err, err
    assert "The last checkpoint, step 9, holds a finite state" in err, err
    steps = sorted(int(p.name) for p in (run_copy / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6, 9]


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", ".lock"])
def test_a_planted_symlink_is_never_written_through(name, run_copy, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    target = run_copy / name
    if name != ".lock":
        shutil.copy(target, tmp_path / "copy")  # keep its content for the link to be readable
    target.unlink(missing_ok=True)
    target.symlink_to(victim)
    capsys.readouterr()
    assert main([*ARGS, "--workdir", str(run_copy), "--steps", "12"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "the user's file\n"


def test_a_symlinked_workdir_is_allowed(tmp_path):
    real = tmp_path / "data" / "runs"
    real.mkdir(parents=True)
    (tmp_path / "runs").symlink_to(real)
    assert main([*ARGS, "--workdir", str(tmp_path / "runs" / "a"), "--steps", "3"]) == 0
    assert (real / "a" / "checkpoints" / "3").is_dir()


def test_a_torn_last_metrics_line_is_skipped_with_a_warning(run_copy, capsys):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss": 1.')
    capsys.readouterr()
    run = analysis.load_run(run_copy)
    assert max(run.history("loss")["step"]) == 9
    assert "torn last line" in capsys.readouterr().err


@contextlib.contextmanager
def read_only(path: Path):
    """`path` on a real read-only bind mount (root on CI may mount; `chmod` does not stop
    root). Yields False where no mount is possible: the caller injects the error instead."""
    cmds = [
        ["mount", "--bind", str(path), str(path)],
        ["mount", "-o", "remount,ro,bind", str(path)],
    ]
    mounted = subprocess.run(cmds[0], capture_output=True).returncode == 0
    ok = mounted and subprocess.run(cmds[1], capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_workdir_is_a_message(run_copy, monkeypatch, capsys):
    argv = [*ARGS, "--workdir", str(run_copy), "--steps", "12"]
    before = tree(run_copy)
    with read_only(run_copy) as mounted:
        if not mounted:  # no mount possible here: the error the kernel would give, injected
            real_open = os.open

            def erofs(path, flags, *args, **kwargs):
                if str(path).startswith(str(run_copy)) and flags & (os.O_WRONLY | os.O_RDWR):
                    raise OSError(errno.EROFS, "Read-only file system", str(path))
                return real_open(path, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", erofs)
        capsys.readouterr()
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "Traceback" not in err, err
    assert tree(run_copy) == before


def test_a_wrongly_typed_config_field_names_the_key(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["model"]["n_layers"] = "two"
    (run_copy / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main([*ARGS, "--workdir", str(run_copy), "--steps", "12"]) == 2
    err = capsys.readouterr().err
    assert "model.n_layers: expected int, got 'two'" in err, err
    assert evaluate.main(["--workdir", str(run_copy)]) == 2
    assert "model.n_layers: expected int" in capsys.readouterr().err


def test_evaluate_refuses_a_negative_batch_count(run_copy, capsys):
    assert evaluate.main(["--workdir", str(run_copy), "--batches", "-1"]) == 2
    assert "--batches -1: must be >= 1" in capsys.readouterr().err


def test_list_into_a_closed_pipe_is_quiet():
    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    proc = subprocess.run(
        f"{sys.executable} {script} --list | head -1",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(proc.stdout.splitlines()) == 1
    assert "Error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_generate_replaces_only_its_own_images_and_refuses_a_file(run_copy, tmp_path, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    listed = [str(out / "image_0.png"), str(out / "image_5.png")]
    (out / "generation.json").write_text(json.dumps({"text": "", "tokens": [], "images": listed}))
    for name in ("image_0.png", "image_5.png", "image_7.png", "notes.txt"):
        (out / name).write_text(name)
    argv = ["--workdir", str(run_copy), "--prompt", "A", "--max-tokens", "3", "--out", str(out)]
    assert generate.main(argv) == 0
    summary = json.loads((out / "generation.json").read_text())
    assert not (out / "image_5.png").exists()  # an earlier sample's image: stale, removed
    assert (out / "image_0.png").exists() == (str(out / "image_0.png") in summary["images"])
    assert (out / "image_7.png").read_text() == "image_7.png"  # not ours: kept
    assert (out / "notes.txt").read_text() == "notes.txt"
    capsys.readouterr()
    assert generate.main([*argv[:-1], str(out / "notes.txt")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "notes.txt"


def test_generate_refuses_a_decompression_bomb_prompt_image(run_copy, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    png_header(bomb, 100_000, 100_000)
    argv = ["--workdir", str(run_copy), "--image", str(bomb), "--out", str(tmp_path / "s")]
    capsys.readouterr()
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert "bomb.png" in err and "Traceback" not in err, err


@pytest.mark.parametrize("bad", ['{"version": "2", "state": []}', "[1, 2]", '{"state": [1]}'])
def test_a_fingerprint_of_the_wrong_shape_is_damage_not_a_crash(bad, run_copy, capsys):
    (run_copy / "checkpoints" / "9" / "fingerprint" / "metadata").write_text(bad)
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(run_copy), "--batches", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint step 9 is damaged" in captured.err
    assert json.loads(captured.out)["step"] == 6


def test_readers_refuse_a_config_json_that_differs_from_the_checkpoint(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["model"]["norm_eps"] = 0.5  # same shapes: it would evaluate silently otherwise
    (run_copy / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(run_copy), "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "differs from the config saved in checkpoint step 9" in err, err
    assert "model.norm_eps" in err


def test_restart_moves_nothing_when_the_run_is_refused_later(run_copy, tmp_path, capsys):
    before = tree(run_copy)
    argv = [*ARGS, "--workdir", str(run_copy), "--restart", "--init-from", str(tmp_path / "no")]
    capsys.readouterr()
    assert main(argv) == 2
    assert "no run there" in capsys.readouterr().err
    assert tree(run_copy) == before
