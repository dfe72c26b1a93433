"""The workdir type and the config diff, without training: the on-disk names stay fixed, checks
only read, the config round-trips, and both allow-lists (resume, upcycling source) apply."""

import dataclasses
from pathlib import Path

import pytest

from moma_jax import registry
from moma_jax.config import ConfigError
from moma_jax.overrides import apply_overrides, config_diff
from moma_jax.train.upcycle import load_source
from moma_jax.train.workdir import Workdir


@pytest.fixture
def cfg():
    return registry.get("dense_tiny")


def test_layout_names_are_the_stable_on_disk_format(tmp_path):
    wd = Workdir(tmp_path)
    assert wd.path == tmp_path and str(wd) == str(tmp_path)
    assert wd.config_file == tmp_path / "config.json"
    assert wd.checkpoints == tmp_path / "checkpoints"
    assert wd.metrics_file == tmp_path / "metrics.jsonl"
    assert wd.tensorboard == tmp_path / "tensorboard"
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(wd, "path", Path("elsewhere"))  # noqa: B010  (mypy rejects the plain assignment)


def test_config_round_trips_and_check_only_reads(tmp_path, cfg):
    wd = Workdir(tmp_path / "run")
    assert wd.read_config() is None
    wd.check(cfg)
    assert not wd.path.exists()  # a check never creates the workdir
    wd.write_config(cfg)
    assert wd.read_config() == cfg
    assert [p.name for p in wd.path.iterdir()] == ["config.json"]  # no temp file left behind
    wd.check(cfg)
    wd.check(apply_overrides(cfg, ["run.log_every=7"]))  # a resume-safe key may change


def test_check_refuses_files_other_experiments_and_changed_configs(tmp_path, cfg):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        Workdir(blocker).check(cfg)
    with pytest.raises(ConfigError, match="lies under the file"):
        Workdir(blocker / "run").check(cfg)
    wd = Workdir(tmp_path / "run")
    wd.write_config(cfg)
    other = dataclasses.replace(cfg, name="dense_90m")
    with pytest.raises(ConfigError, match="holds a run of experiment 'dense_tiny'"):
        wd.check(other)
    with pytest.raises(ConfigError, match=r"optim\.peak_lr: 0\.003 -> 0\.5"):
        wd.check(apply_overrides(cfg, ["optim.peak_lr=0.5"]))


def test_config_diff_lists_sorted_differences_outside_the_allowed_keys(cfg):
    new = apply_overrides(cfg, ["optim.peak_lr=0.5", "model.d_model=64", "run.log_every=3"])
    assert config_diff(cfg, new, lambda key: False) == [
        "model.d_model: 128 -> 64",
        "optim.peak_lr: 0.003 -> 0.5",
        "run.log_every: 10 -> 3",
    ]
    assert config_diff(cfg, new, lambda key: key.startswith(("optim.", "run."))) == [
        "model.d_model: 128 -> 64"
    ]
    assert config_diff(cfg, cfg, lambda key: False) == []


def test_upcycling_source_is_a_workdir_checked_with_its_own_allow_list(tmp_path, cfg):
    source = Workdir(tmp_path / "seed")
    with pytest.raises(ConfigError, match=r"no run there \(no config\.json\)"):
        load_source(source, cfg)
    source.write_config(cfg)
    schedule = apply_overrides(cfg, ["optim.peak_lr=0.5", "run.log_every=3"])
    assert load_source(source, schedule) == cfg  # the schedule may change
    with pytest.raises(ConfigError, match="differs in keys that must match:\n  model.d_model"):
        load_source(source, apply_overrides(cfg, ["model.d_model=64"]))


def test_restart_moves_every_run_file_and_only_those(tmp_path):
    for name in ("config.json", "metrics.jsonl", "init_from.json", "reused_from.json", "notes.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    moved = Workdir(tmp_path).move_aside()
    assert moved is not None and moved.parent == tmp_path / "previous-runs"
    assert sorted(p.name for p in moved.iterdir()) == [
        "checkpoints", "config.json", "init_from.json", "metrics.jsonl", "reused_from.json"
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "previous-runs"]
    assert (tmp_path / "notes.txt").read_text() == "notes.txt"
