"""Every registered experiment builds abstractly with the paper's parameter counts; bad names,
keys and values fail with clear errors."""

import dataclasses

import pytest

from moma_jax import registry
from moma_jax.config import ConfigError
from moma_jax.flops import count_params, paper_params
from moma_jax.overrides import apply_overrides, flatten, resume_conflicts
from moma_jax.runtime import experiment_config
from moma_jax.train.state import abstract_params

# MoMa Table 1, dense column (rounded as printed in the paper).
TABLE_1 = {"dense_90m": 90e6, "dense_435m": 435e6, "dense_1.4b": 1.4e9}


@pytest.mark.parametrize("name", registry.names())
def test_every_experiment_builds_abstractly(name):
    cfg = registry.get(name)
    assert cfg.name == name and cfg.description
    _, params = abstract_params(cfg)
    n = count_params(params)
    assert n > 0
    if name in TABLE_1:
        formula = paper_params(cfg.model)
        assert abs(n - formula) / formula < 0.005, (name, n, formula)
        assert abs(n - TABLE_1[name]) / TABLE_1[name] < 0.06, (name, n)


def test_paper_shapes_match_design_table():
    shapes = {n: registry.get(n).model for n in TABLE_1}
    assert [(m.n_layers, m.d_model, m.n_heads) for m in shapes.values()] == [
        (8, 512, 8),
        (24, 1024, 16),
        (24, 2048, 16),
    ]
    assert all(
        m.vocab_size == 65_536 and m.resolved_ffn_hidden == int(8 * m.d_model / 3)
        for m in shapes.values()
    )
    assert registry.get("dense_1.4b").data.batch_size == 2048
    assert registry.get("dense_90m").optim.total_steps == 160_000


def test_unknown_experiment_lists_close_matches():
    with pytest.raises(ConfigError, match="dense_tiny"):
        registry.get("dense_tiyn")


def test_overrides_parse_types_and_reject_unknown_keys():
    cfg = registry.get("dense_tiny")
    new = apply_overrides(
        cfg,
        [
            "model.d_model=64",
            "model.qk_norm=false",
            "optim.peak_lr=1e-3",
            "model.layer_pattern=dense,dense",
        ],
    )
    assert (new.model.d_model, new.model.qk_norm, new.optim.peak_lr) == (64, False, 1e-3)
    assert new.model.layer_pattern == ("dense", "dense")
    with pytest.raises(ConfigError, match="model.d_model"):
        apply_overrides(cfg, ["model.d_modle=3"])
    with pytest.raises(ConfigError, match="expected a value of type int"):
        apply_overrides(cfg, ["model.d_model=wide"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["model.d_model"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_heads=3", "not divisible"),
        ("model.n_layers=0", "model.n_layers must be positive"),
        ("model.layer_pattern=dense,mod", "unknown layer kinds"),
        ("model.layer_pattern=dense,dense,dense", "repeating unit"),
        ("data.batch_size=0", "data.batch_size must be positive"),
        ("data.micro_batches=3", "not divisible"),
        ("model.norm_order=middle", "norm_order"),
        ("model.compute_dtype=float8", "compute_dtype"),
        ("optim.warmup_steps=1000", "warmup_steps"),
        ("mesh.fsdp=-1", "at most one mesh axis"),
        ("model.scan_unroll=-1", "scan_unroll must be >= 0"),
        ("model.attention=flash", "model.attention='flash' is not one of"),
    ],
)
def test_invalid_configs_fail_at_config_time(override, message):
    """What every entry point does with --exp/--set before building anything: validate the config
    (config.validate) and check its layer kinds (model.kinds, where the layers live)."""
    with pytest.raises(ConfigError, match=message):
        experiment_config("dense_tiny", [override])


def test_resume_conflicts_ignore_logging_keys():
    cfg = registry.get("dense_tiny")
    cadence = dataclasses.replace(cfg.run, log_every=1, eval_every=7)
    assert resume_conflicts(cfg, dataclasses.replace(cfg, run=cadence)) == []
    changed = apply_overrides(cfg, ["optim.peak_lr=0.5"])
    assert resume_conflicts(cfg, changed) == ["optim.peak_lr: 0.003 -> 0.5"]
    assert "model.d_model" in flatten(cfg)


def test_scan_unroll_auto_unrolls_small_stacks_and_resumes_runs_saved_scanned():
    """0 (the default): every unit unrolled up to AUTO_UNROLL_UNITS without remat, else scanned
    one unit per step; an explicit value wins. A run saved under the earlier default (1) resumes."""
    tiny = registry.get("dense_tiny")
    assert tiny.model.scan_unroll == 0 and tiny.model.resolved_scan_unroll == tiny.model.n_units
    assert registry.get("dense_1.4b").model.resolved_scan_unroll == 1  # 24 units
    mod = registry.get("mod_moma_4t4i_tiny").model  # a 2-kind unit: n_layers / 2 units
    assert mod.resolved_scan_unroll == mod.n_units == mod.n_layers // 2
    assert apply_overrides(tiny, ["model.scan_unroll=2"]).model.resolved_scan_unroll == 2
    # Unrolled, remat saves no memory (XLA keeps every layer's activations): scanned then.
    assert apply_overrides(tiny, ["model.remat=dots"]).model.resolved_scan_unroll == 1
    assert registry.get("dense_90m").model.resolved_scan_unroll == 1  # 8 units, remat dots
    assert resume_conflicts(apply_overrides(tiny, ["model.scan_unroll=1"]), tiny) == []


USER_MODULE = '''
import dataclasses
from moma_jax.registry import get, register


@register("{name}")
def wide():
    """dense_tiny at width 64 (a user's experiment)."""
    cfg = get("dense_tiny")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=64))
'''


def test_user_experiments_register_from_a_file_or_a_module(tmp_path, monkeypatch, capsys):
    from moma_jax.commands.cli import main as train_main
    from moma_jax.commands.describe import main as describe_main

    path = tmp_path / "lab_file_exps.py"
    path.write_text(USER_MODULE.format(name="user_file_tiny"))
    argv = ["--experiments", str(path), "--exp", "user_file_tiny"]
    assert train_main([*argv, "--print-config"]) == 0
    assert '"d_model": 64' in capsys.readouterr().out
    # Loading the same file again (a second command in one process) is a no-op, not a clash.
    assert describe_main([*argv, "--json"]) == 0
    assert '"d_model": 64' in capsys.readouterr().out

    (tmp_path / "lab_module_exps.py").write_text(USER_MODULE.format(name="user_module_tiny"))
    monkeypatch.chdir(tmp_path)
    assert train_main(["--experiments", "lab_module_exps", "--list"]) == 0
    assert "user_module_tiny" in capsys.readouterr().out

    assert train_main(["--experiments", "no_such_module_xyz", "--list"]) == 2
    assert "cannot import" in capsys.readouterr().err
    # A module written before the bundled experiments moved out of the library says where.
    old = tmp_path / "lab_old_exps.py"
    old.write_text("from moma_jax.experiments.dense import dense_tiny\n")
    assert train_main(["--experiments", str(old), "--list"]) == 2
    assert "top-level package `experiments`" in capsys.readouterr().err
    assert train_main(["--exp", "user_missing_tiny"]) == 2
    assert "--experiments MODULE" in capsys.readouterr().err
