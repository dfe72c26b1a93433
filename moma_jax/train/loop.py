"""The training loop: inputs, state (fresh, upcycled or resumed), steps, metrics, checkpoints.

Resume precedence (`train.resume`): if `workdir/checkpoints` holds an intact committed
checkpoint, the run continues from the latest one (model, optimizer, data iterator); a damaged
latest step is reported and the one before it used. Otherwise the run starts fresh, from
`run.init_from` when set (upcycling), but never over an earlier run unless `restart` moved it
aside. A workdir remembers its experiment and config (config.json and each checkpoint);
resuming with another experiment or a changed key outside `config.RESUME_SAFE_KEYS` is refused.

Every input is checked before the workdir is touched, so bad input never creates or changes a
checkpoint; a state is checkpointed only after its own metrics passed the NaN check and its
every value is finite (`Checkpointer.save`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax

from moma_jax import data as data_lib
from moma_jax.config import ConfigError, ExperimentConfig, validate
from moma_jax.losses import means_from_sums
from moma_jax.model import aux_router
from moma_jax.model.kinds import train_flops_per_token
from moma_jax.runtime import with_data_shares
from moma_jax.safe_io import write_atomic
from moma_jax.sharding import batch_sharding, check_mesh, make_mesh, replicated
from moma_jax.train import controls as controls_lib
from moma_jax.train import faults, preflight, resume, upcycle
from moma_jax.train import step as step_lib
from moma_jax.train.checkpoint import Checkpointer, NonFiniteStateError, RunCheckpoints
from moma_jax.train.metric_log import (
    INIT_FROM_FILE,
    MetricLog,
    TrainingDivergedError,
    host_values,
    offsets_of,
)
from moma_jax.train.metrics import MetricWriter, NullWriter
from moma_jax.train.state import TrainState, fresh_state, init_state, make_optimizer
from moma_jax.train.step import make_eval_step
from moma_jax.train.workdir import Workdir


def train(
    cfg: ExperimentConfig, workdir: Path, stop_step: int | None = None, restart: bool = False
) -> dict[str, float]:
    """Trains until `stop_step` (default: the schedule's end); returns the last logged metrics.
    `restart`: an earlier run in the workdir is moved into previous-runs/ and this one starts
    fresh (without it, a workdir holding a run resumes it or is refused)."""
    run_dir = Workdir(Path(workdir))
    # --- Inputs: every one checked before anything is written -----------------------------
    data_dir, manifest, cfg, stop = _check_inputs(cfg, run_dir, stop_step, restart)
    mesh = make_mesh(cfg.mesh)
    check_mesh(cfg, dict(mesh.shape))
    data_iter, eval_data = _make_iterators(cfg, data_dir)

    # --- One run per workdir: held from here (after the input checks) to the end -----------
    primary = jax.process_index() == 0
    with (
        faults.WorkdirLock(run_dir.path) if primary else contextlib.nullcontext(),
        faults.PreemptionWatch() as watch,
    ):
        return _train_locked(
            cfg, run_dir, manifest, mesh, data_iter, eval_data, stop, watch, restart
        )


def _train_locked(cfg, run_dir, manifest, mesh, data_iter, eval_data, stop, watch, restart):
    # --- State and steps --------------------------------------------------------------------
    tx = make_optimizer(cfg.optim, cfg.model.aux_routers)
    graphdef, init_fn, abstract, shardings = init_state(cfg, tx, mesh)
    steps = _make_steps(cfg, graphdef, tx, shardings, mesh, eval_data)
    start, state, offsets = _initial_state(
        cfg, run_dir, init_fn, abstract, tx, mesh, shardings, data_iter, restart, manifest
    )
    if start >= stop:
        print(f"nothing to do: the workdir is at step {start} >= --steps {stop}", flush=True)
        return {}
    first_batch = next(data_iter)  # a bad record stops the run here, before any write

    # --- Outputs (the workdir's shared files by process 0; checkpoints by all) ---------------
    # `--restart` moves the earlier run aside only now, when nothing can refuse the run anymore.
    if restart:
        resume.restart(run_dir)
    primary = jax.process_index() == 0
    if primary:
        run_dir.write_config(cfg)
        if offsets is not None:
            write_atomic(run_dir.path / INIT_FROM_FILE, json.dumps(offsets, indent=2) + "\n")
    ckpt = Checkpointer(run_dir.checkpoints, cfg.run)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    writer: MetricWriter | NullWriter = (
        MetricWriter(run_dir.metrics_file, run_dir.tensorboard, start, stop, tokens_per_step)
        if primary
        else NullWriter()
    )

    # --- Loop -------------------------------------------------------------------------------
    try:
        return _run_loop(
            cfg, steps, state, start, stop, first_batch, data_iter, manifest, ckpt, writer, watch
        )
    except (TrainingDivergedError, NonFiniteStateError) as e:
        with contextlib.suppress(Exception):
            ckpt.wait()  # the last checkpoint named below is committed, not in flight
        raise TrainingDivergedError(f"{e}. {_last_checkpoint(ckpt)}") from e
    except Exception as e:  # Orbax wraps a failed async write in its own errors
        if faults.is_disk_full(e):
            committed = ckpt.committed_steps()
            raise faults.disk_full_error(
                Path(getattr(e, "filename", None) or run_dir.path), e, max(committed, default=None)
            ) from e
        raise
    finally:
        with contextlib.suppress(OSError):
            writer.close()
        with contextlib.suppress(Exception):
            ckpt.close()


def _last_checkpoint(ckpt: Checkpointer) -> str:
    steps = ckpt.committed_steps()
    if not steps:
        return (
            "No checkpoint was committed: lower optim.peak_lr or check the data, then rerun "
            "with --restart (moves this run aside) or in a new --workdir."
        )
    return (
        f"The last checkpoint, step {steps[-1]}, holds a finite state (checked when it was "
        "saved): rerun the same command to resume from it once the data is fixed, or lower "
        "optim.peak_lr in a new --workdir (or with --restart, which moves this run aside)."
    )


def _check_inputs(
    cfg: ExperimentConfig, workdir: Workdir, stop_step: int | None, restart: bool = False
) -> tuple[Path, dict, ExperimentConfig, int]:
    """(data dir, manifest, resolved config, stop step); raises, naming the fix, on bad input.

    Writes nothing to the workdir, so that bad input never creates or changes one.
    """
    data_dir = data_lib.ensure_data(cfg.data.path or None)
    manifest = data_lib.load_manifest(data_dir)
    data_vocab = manifest["vocab"]["size"]
    if cfg.model.vocab_size < data_vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
            f"({data_vocab} ids in {data_dir}); set model.vocab_size >= {data_vocab}"
        )
    cfg = validate(with_data_shares(cfg, manifest))
    if cfg.model.aux_routers == "posthoc" and not cfg.run.init_from:
        raise ConfigError(
            f"{cfg.name or 'this experiment'} trains auxiliary routers for a finished run with "
            "its main model frozen: pass --init-from WORKDIR of that run"
        )
    preflight.check(cfg)  # float16 on CPU, a state larger than the memory: before compiling
    stop = cfg.optim.total_steps if stop_step is None else stop_step
    if not 0 < stop <= cfg.optim.total_steps:
        raise ConfigError(f"--steps must be in 1..optim.total_steps={cfg.optim.total_steps}")
    workdir.check(cfg, restart)
    return data_dir, manifest, cfg, stop


def _make_iterators(cfg: ExperimentConfig, data_dir: Path) -> tuple[Iterator[dict], list[dict]]:
    """This process's endless, checkpointable training iterator and its held-out batches."""
    process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    data_iter = data_lib.make_train_iterator(
        data_dir,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        seed=cfg.data.seed,
        streams=cfg.data.streams,
        **process,
    )
    eval_data = data_lib.eval_batches(
        data_dir,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        num_batches=cfg.run.eval_batches,
        **process,
    )
    return data_iter, eval_data


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The jitted train step and the held-out evaluation, placing batches the same way."""

    train: Callable  # (state, device batch) -> (state, device metrics)
    evaluate: Callable[[Any], dict[str, float]]  # params -> host eval_* means ({} if no data)
    to_device: Callable[[dict], dict]
    has_eval: bool


def _make_steps(cfg, graphdef, tx, shardings, mesh, eval_data: list[dict]) -> _Steps:
    """The train step (jitted once with shardings and donation) and the held-out evaluation."""
    batch_sh = batch_sharding(mesh)
    train_step = step_lib.jit_train_step(graphdef, cfg, tx, shardings, batch_sh, mesh)

    def jit_eval(routing: str) -> Callable:
        return jax.jit(
            step_lib.with_mesh(make_eval_step(graphdef, cfg, routing), mesh),
            in_shardings=(shardings.params, batch_sh),
            out_shardings=replicated(mesh),
        )

    # Runs with aux routers are also evaluated causally (eval_causal_*; model/aux_router.py).
    routings = {"eval_": jit_eval("teacher_forced")}
    if cfg.model.aux_routers != "none":
        routings["eval_causal_"] = jit_eval("causal")

    def to_device(batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}

    def evaluate(params) -> dict[str, float]:
        if not eval_data:
            return {}
        out: dict[str, float] = {}
        for prefix, eval_step in routings.items():
            sums = [eval_step(params, to_device(batch)) for batch in eval_data]
            total = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *sums)
            out.update(host_values(means_from_sums(total, prefix=prefix)))
            if prefix == "eval_":  # the aux routers against the training routers, held out
                rates = aux_router.with_rates(total["aux"])
                out.update(host_values({f"eval_{k}": v for k, v in rates.items()}))
        return out

    return _Steps(train_step, evaluate, to_device, has_eval=bool(eval_data))


def _initial_state(
    cfg: ExperimentConfig,
    workdir: Workdir,
    init_fn,
    abstract,
    tx,
    mesh,
    shardings,
    data_iter,
    restart: bool,
    manifest: dict[str, Any],
) -> tuple[int, TrainState, dict[str, Any] | None]:
    """(start step, state, init_from.json's content or None): the workdir's latest intact
    checkpoint (iterator restored in place), else upcycled from `run.init_from`, else fresh
    (`restart`: always fresh; the caller moves the earlier run aside)."""
    start, state = (
        (0, None) if restart else resume.resume(cfg, workdir, abstract, data_iter, manifest)
    )
    if state is not None:
        print(f"resumed {cfg.name} from {workdir} at step {start}", flush=True)
        return start, state, None
    if cfg.run.init_from:
        return start, *_upcycle(cfg, init_fn(), tx, mesh, shardings, data_iter)
    return start, init_fn(), None


def _upcycle(
    cfg: ExperimentConfig, fresh, tx, mesh, shardings, data_iter
) -> tuple[TrainState, dict[str, Any]]:
    """A fresh state whose parameters and data position come from the run in run.init_from,
    and the source's tokens and FLOPs up to that step (written to `init_from.json`: this run's
    logged `tokens` and `flops` start from them)."""
    source = Workdir(Path(cfg.run.init_from))
    source_cfg = upcycle.load_source(source, cfg)
    source_tx = make_optimizer(source_cfg.optim, source_cfg.model.aux_routers)
    _, _, source_abstract, _ = init_state(source_cfg, source_tx, mesh)
    # Read-only: a damaged step of the source is skipped with a warning, never renamed there.
    source_ckpts = RunCheckpoints(source.checkpoints)
    step, source_state, damaged = source_ckpts.latest_intact(source_abstract, data_iter)
    if source_state is None:
        what = f"every checkpoint is damaged ({damaged})" if damaged else "no checkpoint yet"
        raise ConfigError(f"--init-from {cfg.run.init_from}: the run has {what}")
    source_ckpts.check_config(step, source_cfg)
    aux_stage = cfg.model.aux_routers == "posthoc"
    params = upcycle.upcycled_state(fresh.params, source_state.params, shardings.params, aux_stage)
    how = "loaded and frozen; aux routers train" if aux_stage else "upcycled"
    print(f"initialised from {cfg.run.init_from} at its step {step} ({how})", flush=True)
    seq = source_cfg.data.seq_len
    tokens = step * source_cfg.data.batch_size * seq
    offsets = {
        "source": str(cfg.run.init_from),
        "source_step": step,
        "tokens": tokens,
        "flops": tokens * train_flops_per_token(source_cfg.model, seq),
        "flops_executed": tokens * train_flops_per_token(source_cfg.model, seq, True),
    }

    # A source with the same adapted losses hands over its coefficients (an aux-router stage
    # or a ReMoE run upcycled from a ReMoE run); otherwise they start afresh.
    def targets(c: ExperimentConfig) -> dict[str, tuple[str, float]]:
        return {k: (s.metric, s.target) for k, s in controls_lib.specs(c).items()}

    same = targets(source_cfg) == targets(cfg)
    controls = source_state.controls if same else fresh.controls
    reset = jax.jit(
        lambda p, c: fresh_state(cfg, p, tx).replace(controls=c), out_shardings=shardings
    )
    return reset(params, controls), offsets


def _run_loop(
    cfg: ExperimentConfig,
    steps: _Steps,
    state: TrainState,
    start: int,
    stop: int,
    first_batch: dict,
    data_iter: Iterator[dict],
    manifest: dict,
    ckpt: Checkpointer,
    writer: MetricWriter | NullWriter,
    watch: faults.PreemptionWatch,
) -> dict[str, float]:
    """Steps `start + 1 .. stop`; returns the last logged metrics.

    A step's metrics are fetched while the next step runs (one step late, so the host never
    waits on the device), except on eval and checkpoint steps: those are checked at once, so a
    state is saved only after its own metrics passed the NaN check. `first_batch` was taken
    from `data_iter` already; the iterator is saved with each checkpoint.
    """
    batches = itertools.chain([first_batch], data_iter)
    log = MetricLog(cfg, writer, stop, offsets_of(ckpt.directory.parent))
    if start == 0 and steps.has_eval:
        counts = {"tokens": 0, "flops": 0.0, **log.offsets}
        writer.write(0, {**counts, **steps.evaluate(state.params)})
    config_dict = dataclasses.asdict(cfg)
    pending = None
    for step in range(start + 1, stop + 1):
        state, metrics = steps.train(state, steps.to_device(next(batches)))
        if pending is not None:
            log.finish(*pending, {})
        pending = (step, metrics)
        ckpt.check_for_errors()  # an async save that failed (full disk) stops the run now
        is_eval = step % cfg.run.eval_every == 0 or step == stop
        is_ckpt = step % cfg.run.checkpoint_every == 0 or step == stop
        signum = watch.requested(step)
        if is_eval or is_ckpt or signum:
            log.finish(step, metrics, steps.evaluate(state.params) if is_eval else {})
            pending = None
            if is_ckpt or signum:  # saved only after this step's metrics passed the NaN check
                ckpt.save(step, state, data_iter, config_dict, manifest)
        if signum:
            ckpt.wait()
            raise faults.Preempted(step, signum)
    ckpt.wait()
    return log.last
