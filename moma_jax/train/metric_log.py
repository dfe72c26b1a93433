"""The metrics of each training step: fetched from the device, checked for NaN (a non-finite
loss or gradient norm stops the run before its state is saved), and written on logging steps
with the cumulative tokens and FLOPs (an `--init-from` run counting from its source's) and the
mean training loss over the steps since the previous write (`loss_mean*`, `loss_mean_steps`)."""

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
WINDOW_KEYS = ("loss", "loss_text", "loss_image")  # logged also as loss_mean* over the window


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
        self.started = round(time.time(), 3)  # names this process's records (its restarts')
        self.window: dict[str, list[float]] = {}  # training losses since the last write

    def finish(self, step: int, metrics: dict, extra: dict[str, float]) -> None:
        """Fetches one step's metrics (raising on NaN) and logs them on logging steps."""
        host = host_values(metrics)
        _check_finite(step, host)
        for key in WINDOW_KEYS:
            if host.get(key):  # 0: the modality was absent from this batch (losses.py)
                self.window.setdefault(key, []).append(host[key])
        if step % self.log_every == 0 or extra or step == self.stop:
            tokens = step * self.tokens_per_step
            last = {"tokens": tokens, **{k: tokens * v for k, v in self.per_token.items()}}
            last = {k: v + self.offsets.get(k, 0) for k, v in last.items()}
            last.update({**host, **extra})
            # The mean over every step since the previous write: the training-loss curve a
            # comparison can use (one batch's loss is noisy; a trailing mean of logged batches
            # lags by a different number of FLOPs for each model).
            for key, values in self.window.items():
                last[key.replace("loss", "loss_mean", 1)] = float(np.mean(values))
            if "loss" in self.window:
                last["loss_mean_steps"] = len(self.window["loss"])
            self.window = {}
            # Seconds since this process's loop started (compare.py measures step time from it).
            last["time_s"] = time.perf_counter() - self.start
            last["process_started"] = self.started
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
