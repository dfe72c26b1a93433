"""The training loop: data, state (fresh or resumed), steps, metrics, evaluation, checkpoints.

Resume precedence: if `workdir/checkpoints` holds a committed checkpoint, the run continues from
the latest one (model, optimizer, data iterator); otherwise it starts fresh. A workdir remembers
its experiment and config (`workdir/config.json`); resuming with a different experiment or a
changed key outside `config.RESUME_SAFE_KEYS` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from moma_jax import data as data_lib
from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.data.vocab import MODALITY_NAMES
from moma_jax.flops import train_flops_per_token
from moma_jax.losses import means_from_sums
from moma_jax.overrides import from_dict, resume_conflicts, to_dict
from moma_jax.sharding import batch_sharding, make_mesh, replicated
from moma_jax.train.checkpoint import Checkpointer
from moma_jax.train.metrics import MetricWriter
from moma_jax.train.state import init_state, make_optimizer
from moma_jax.train.step import make_eval_step, make_train_step

CONFIG_FILE = "config.json"


class TrainingDivergedError(RuntimeError):
    """A non-finite metric; the message names the step and the metric."""


def prepare_workdir(cfg: ExperimentConfig, workdir: Path) -> None:
    """Creates the workdir, or checks that it belongs to this experiment and config."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} exists and is not a directory; choose another path")
    for parent in workdir.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(
                f"workdir {workdir} lies under the file {parent}; choose another path"
            )
    saved_path = workdir / CONFIG_FILE
    if saved_path.exists():
        saved = from_dict(ExperimentConfig, json.loads(saved_path.read_text()))
        if saved.name != cfg.name:
            raise ConfigError(
                f"workdir {workdir} holds a run of experiment {saved.name!r}, not {cfg.name!r}; "
                "use another --workdir (or the same experiment to resume)"
            )
        conflicts = resume_conflicts(saved, cfg)
        if conflicts:
            raise ConfigError(
                f"workdir {workdir} was started with a different config; resuming would change "
                "the run:\n  "
                + "\n  ".join(conflicts)
                + "\nuse the original --set values, or a new --workdir"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = saved_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2))
    tmp.replace(saved_path)


def with_data_shares(cfg: ExperimentConfig, manifest: dict) -> ExperimentConfig:
    """Fills model.moe.modality_shares from the data manifest's train split when unset."""
    moe = cfg.model.moe
    if moe.modality_shares or "moe" not in cfg.model.layer_pattern:
        return cfg
    shares = manifest["splits"]["train"]["modality_shares"]
    moe = dataclasses.replace(moe, modality_shares=tuple(shares[n] for n in MODALITY_NAMES))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))


def _host(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    for key in ("loss", "loss_total", "grad_norm"):
        if key in metrics and not math.isfinite(metrics[key]):
            raise TrainingDivergedError(
                f"step {step}: {key} is {metrics[key]}; the run stopped before saving this state. "
                "The last checkpoint is intact; lower optim.peak_lr or check the data."
            )


def train(cfg: ExperimentConfig, workdir: Path, stop_step: int | None = None) -> dict[str, float]:
    """Trains until `stop_step` (default: the schedule's end); returns the last logged metrics."""
    # --- Data and workdir -------------------------------------------------------------------
    data_dir = data_lib.ensure_data(cfg.data.path or None)
    manifest = data_lib.load_manifest(data_dir)
    data_vocab = manifest["vocab"]["size"]
    if cfg.model.vocab_size < data_vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({data_vocab} ids in {data_dir}); set model.vocab_size >= {data_vocab}"
        )
    cfg = with_data_shares(cfg, manifest)
    stop = cfg.optim.total_steps if stop_step is None else stop_step
    if not 0 < stop <= cfg.optim.total_steps:
        raise ConfigError(f"--steps must be in 1..optim.total_steps={cfg.optim.total_steps}")
    workdir = Path(workdir)
    prepare_workdir(cfg, workdir)

    # --- Mesh, state, steps -----------------------------------------------------------------
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim)
    graphdef, init_fn, abstract, shardings = init_state(cfg, tx, mesh)
    batch_sh = batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(graphdef, cfg, tx),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(graphdef, cfg),
        in_shardings=(shardings.params, batch_sh),
        out_shardings=replicated(mesh),
    )
    data_iter = data_lib.make_train_iterator(
        data_dir,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    eval_data = data_lib.eval_batches(
        data_dir,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        num_batches=cfg.run.eval_batches,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    def to_device(batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}

    def evaluate(params) -> dict[str, float]:
        if not eval_data:
            return {}
        total = None
        for batch in eval_data:
            sums = eval_step(params, to_device(batch))
            total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
        return _host(means_from_sums(total, prefix="eval_"))

    # --- Fresh start or resume --------------------------------------------------------------
    ckpt = Checkpointer(workdir / "checkpoints", cfg.run)
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, abstract, data_iter)
        print(f"resumed {cfg.name} from {workdir} at step {start}", flush=True)
    else:
        state = init_fn()
    if start >= stop:
        ckpt.close()
        print(f"nothing to do: the workdir is at step {start} >= --steps {stop}", flush=True)
        return {}
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    executed_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len, executed=True)
    writer = MetricWriter(workdir, start, stop)
    writer.tokens_per_step = tokens_per_step
    config_dict = dataclasses.asdict(cfg)

    def counters(step: int) -> dict[str, float]:
        tokens = step * tokens_per_step
        return {
            "tokens": tokens,
            "flops": tokens * flops_per_token,
            "flops_executed": tokens * executed_per_token,
        }

    last: dict[str, float] = {}

    def finish(step: int, metrics: dict, extra: dict[str, float]) -> None:
        """Checks one step's metrics (fetched a step late) and logs them on logging steps."""
        nonlocal last
        host = _host(metrics)
        _check_finite(step, host)
        if step % cfg.run.log_every == 0 or extra or step == stop:
            last = {**counters(step), **host, **extra}
            writer.write(step, last)

    # --- Loop -------------------------------------------------------------------------------
    try:
        if start == 0 and eval_data:
            writer.write(0, {**counters(0), **evaluate(state.params)})
        pending = None
        for step in range(start + 1, stop + 1):
            state, metrics = train_step(state, to_device(next(data_iter)))
            if pending is not None:
                finish(*pending, {})
            pending = (step, metrics)
            is_eval = step % cfg.run.eval_every == 0 or step == stop
            is_ckpt = step % cfg.run.checkpoint_every == 0 or step == stop
            if is_eval or is_ckpt:
                # A state is checkpointed only after its own metrics passed the NaN check.
                finish(step, metrics, evaluate(state.params) if is_eval else {})
                pending = None
                if is_ckpt:
                    ckpt.save(step, state, data_iter, config_dict, manifest)
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    return last
