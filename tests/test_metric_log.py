"""The training loop's metric log: the mean training loss over every step since the previous
write, beside the step's own loss (what compare.py's training-loss eta reads)."""

import numpy as np
import pytest

from moma_jax.runtime import experiment_config
from moma_jax.train.metric_log import MetricLog, TrainingDivergedError
from moma_jax.train.metrics import NullWriter


class Writer(NullWriter):
    def __init__(self):
        self.rows = {}

    def write(self, step, record):
        self.rows[step] = dict(record)


def test_window_means_cover_every_step_since_the_last_write():
    cfg = experiment_config("dense_tiny", ["run.log_every=5"])
    writer = Writer()
    log = MetricLog(cfg, writer, stop=12, offsets={})
    started = log.started
    losses = np.linspace(3.0, 2.0, 12)
    for step in range(1, 13):
        image = 0.0 if step == 3 else losses[step - 1] - 1  # step 3's batch had no image
        log.finish(step, {"loss": losses[step - 1], "loss_image": image}, {})
    assert sorted(writer.rows) == [5, 10, 12]
    five, ten, last = writer.rows[5], writer.rows[10], writer.rows[12]
    assert five["loss"] == pytest.approx(losses[4])  # the step's own batch
    assert five["loss_mean"] == pytest.approx(losses[:5].mean()) and five["loss_mean_steps"] == 5
    assert five["loss_mean_image"] == pytest.approx((losses[[0, 1, 3, 4]] - 1).mean())
    assert ten["loss_mean"] == pytest.approx(losses[5:10].mean())
    assert last["loss_mean"] == pytest.approx(losses[10:].mean()) and last["loss_mean_steps"] == 2
    # One process's records share its start, which tells a restart apart (compare's step time).
    assert {r["process_started"] for r in writer.rows.values()} == {started}
    with pytest.raises(TrainingDivergedError, match="step 13: loss is nan"):
        log.finish(13, {"loss": float("nan")}, {})
