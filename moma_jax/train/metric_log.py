"""The metrics of each training step: fetched from the device, checked for NaN (a non-finite
loss or gradient norm stops the run before its state is saved), and written on logging steps
with the cumulative tokens and FLOPs (an `--init-from` run counting from its source's)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np

from moma_jax.config import ExperimentConfig
from moma_jax.model.kinds import train_flops_per_token
from moma_jax.train.metrics import MetricWriter, NullWriter

INIT_FROM_FILE = "init_from.json"  # an upcycled run's starting tokens and FLOPs


class TrainingDivergedError(RuntimeError):
    """A non-finite metric; the message names the step and the metric."""


class MetricLog:
    """Checks each step's metrics for NaN and writes those of logging steps, with the
    cumulative tokens and FLOPs; `last` is the latest record written."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        writer: MetricWriter | NullWriter,
        stop: int,
        offsets: dict[str, float],
    ):
        self.writer, self.stop, self.log_every = writer, stop, cfg.run.log_every
        self.offsets = offsets  # an upcycled run counts its source's tokens and FLOPs
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.per_token = {
            "flops": train_flops_per_token(cfg.model, cfg.data.seq_len),
            "flops_executed": train_flops_per_token(cfg.model, cfg.data.seq_len, executed=True),
        }
        self.last: dict[str, float] = {}
        self.start = time.perf_counter()

    def finish(self, step: int, metrics: dict, extra: dict[str, float]) -> None:
        """Fetches one step's metrics (raising on NaN) and logs them on logging steps."""
        host = host_values(metrics)
        _check_finite(step, host)
        if step % self.log_every == 0 or extra or step == self.stop:
            tokens = step * self.tokens_per_step
            last = {"tokens": tokens, **{k: tokens * v for k, v in self.per_token.items()}}
            last = {k: v + self.offsets.get(k, 0) for k, v in last.items()}
            last.update({**host, **extra})
            # Seconds since this process's loop started (compare.py measures step time from it).
            last["time_s"] = time.perf_counter() - self.start
            self.writer.write(step, last)
            self.last = last


def offsets_of(workdir: Path) -> dict[str, float]:
    """The tokens and FLOPs an upcycled run starts from ({} for any other run)."""
    path = workdir / INIT_FROM_FILE
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {k: saved[k] for k in ("tokens", "flops", "flops_executed")}


def host_values(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}


def _check_finite(step: int, metrics: dict[str, float]) -> None:
    for key in ("loss", "loss_total", "grad_norm"):
        if key in metrics and not math.isfinite(metrics[key]):
            raise TrainingDivergedError(
                f"step {step}: {key} is {metrics[key]}; the run stopped before saving this state"
            )
