"""The training loop: inputs, state (fresh, upcycled or resumed), steps, metrics, checkpoints.

Resume precedence: if `workdir/checkpoints` holds an intact committed checkpoint, the run
continues from the latest one (model, optimizer, data iterator); a damaged latest step is moved
aside with a warning and the one before it is used. Otherwise the run starts fresh, from
`run.init_from` when set (upcycling). A workdir remembers its experiment and config; resuming
with another experiment or a changed key outside `config.RESUME_SAFE_KEYS` is refused.

Every input is checked before the workdir is touched, so bad input never creates or changes a
checkpoint; a state is checkpointed only after its own metrics passed the NaN check.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moma_jax import data as data_lib
from moma_jax.config import ConfigError, ExperimentConfig, validate
from moma_jax.flops import train_flops_per_token
from moma_jax.losses import means_from_sums
from moma_jax.runtime import with_data_shares
from moma_jax.sharding import batch_sharding, make_mesh, replicated
from moma_jax.train import step as step_lib
from moma_jax.train import upcycle
from moma_jax.train.checkpoint import Checkpointer, restore_latest
from moma_jax.train.metrics import MetricWriter
from moma_jax.train.state import TrainState, init_state, make_optimizer
from moma_jax.train.step import make_eval_step
from moma_jax.train.workdir import check_workdir, write_config


class TrainingDivergedError(RuntimeError):
    """A non-finite metric; the message names the step and the metric."""


def _host(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    for key in ("loss", "loss_total", "grad_norm"):
        if key in metrics and not math.isfinite(metrics[key]):
            raise TrainingDivergedError(
                f"step {step}: {key} is {metrics[key]}; the run stopped before saving this state. "
                "The last checkpoint is intact; lower optim.peak_lr or check the data."
            )


def _upcycle(cfg: ExperimentConfig, fresh: TrainState, tx, mesh, shardings, data_iter):
    """A fresh state whose parameters and data position come from the run in run.init_from."""
    source_cfg, source_dir = upcycle.load_source(Path(cfg.run.init_from), cfg)
    _, _, source_abstract, _ = init_state(source_cfg, make_optimizer(source_cfg.optim), mesh)
    step, source_state = restore_latest(source_dir, source_cfg.run, source_abstract, data_iter)
    if source_state is None:
        raise ConfigError(f"--init-from {cfg.run.init_from}: the run has no checkpoint yet")
    params = upcycle.upcycled_state(fresh.params, source_state.params, shardings.params)
    print(f"initialised from {cfg.run.init_from} at its step {step} (upcycled)", flush=True)
    reset = jax.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
        out_shardings=shardings,
    )
    return reset(params)


def train(cfg: ExperimentConfig, workdir: Path, stop_step: int | None = None) -> dict[str, float]:
    """Trains until `stop_step` (default: the schedule's end); returns the last logged metrics."""
    # --- Inputs: checked before anything is written ---------------------------------------
    data_dir = data_lib.ensure_data(cfg.data.path or None)
    manifest = data_lib.load_manifest(data_dir)
    data_vocab = manifest["vocab"]["size"]
    if cfg.model.vocab_size < data_vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({data_vocab} ids in {data_dir}); set model.vocab_size >= {data_vocab}"
        )
    cfg = validate(with_data_shares(cfg, manifest))
    stop = cfg.optim.total_steps if stop_step is None else stop_step
    if not 0 < stop <= cfg.optim.total_steps:
        raise ConfigError(f"--steps must be in 1..optim.total_steps={cfg.optim.total_steps}")
    workdir = Path(workdir)
    check_workdir(cfg, workdir)
    mesh = make_mesh(cfg.mesh)
    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    data_iter = data_lib.make_train_iterator(
        data_dir,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed,
        **process,
    )
    eval_data = data_lib.eval_batches(
        data_dir,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        num_batches=cfg.run.eval_batches,
        **process,
    )

    # --- State and steps --------------------------------------------------------------------
    tx = make_optimizer(cfg.optim)
    graphdef, init_fn, abstract, shardings = init_state(cfg, tx, mesh)
    batch_sh = batch_sharding(mesh)
    train_step = step_lib.jit_train_step(graphdef, cfg, tx, shardings, batch_sh, mesh)
    eval_step = jax.jit(
        make_eval_step(graphdef, cfg),
        in_shardings=(shardings.params, batch_sh),
        out_shardings=replicated(mesh),
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

    ckpt_dir = workdir / "checkpoints"
    start, state = restore_latest(ckpt_dir, cfg.run, abstract, data_iter)
    if state is not None:
        print(f"resumed {cfg.name} from {workdir} at step {start}", flush=True)
    elif cfg.run.init_from:
        state = _upcycle(cfg, init_fn(), tx, mesh, shardings, data_iter)
    else:
        state = init_fn()
    if start >= stop:
        print(f"nothing to do: the workdir is at step {start} >= --steps {stop}", flush=True)
        return {}
    first_batch = next(data_iter)  # a bad record stops the run here, before any write

    # --- Outputs ----------------------------------------------------------------------------
    write_config(cfg, workdir)
    ckpt = Checkpointer(ckpt_dir, cfg.run)
    writer = MetricWriter(workdir, start, stop)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    writer.tokens_per_step = tokens_per_step
    per_token = {
        "flops": train_flops_per_token(cfg.model, cfg.data.seq_len),
        "flops_executed": train_flops_per_token(cfg.model, cfg.data.seq_len, executed=True),
    }
    config_dict = dataclasses.asdict(cfg)
    last: dict[str, float] = {}

    def finish(step: int, metrics: dict, extra: dict[str, float]) -> None:
        """Checks one step's metrics (fetched a step late) and logs them on logging steps."""
        nonlocal last
        host = _host(metrics)
        _check_finite(step, host)
        if step % cfg.run.log_every == 0 or extra or step == stop:
            tokens = step * tokens_per_step
            last = {"tokens": tokens, **{k: tokens * v for k, v in per_token.items()}}
            last.update({**host, **extra})
            writer.write(step, last)

    # --- Loop -------------------------------------------------------------------------------
    try:
        if start == 0 and eval_data:
            writer.write(0, {"tokens": 0, "flops": 0.0, **evaluate(state.params)})
        pending = None
        for step in range(start + 1, stop + 1):
            batch = first_batch if step == start + 1 else next(data_iter)
            state, metrics = train_step(state, to_device(batch))
            if pending is not None:
                finish(*pending, {})
            pending = (step, metrics)
            is_eval = step % cfg.run.eval_every == 0 or step == stop
            is_ckpt = step % cfg.run.checkpoint_every == 0 or step == stop
            if is_eval or is_ckpt:
                finish(step, metrics, evaluate(state.params) if is_eval else {})
                pending = None
                if is_ckpt:
                    ckpt.save(step, state, data_iter, config_dict, manifest)
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    return last
