"""Metric sinks: `metrics.jsonl` (one JSON object per logged step), TensorBoard, a progress line.

metrics.jsonl is a stable format: every line has `step`, `tokens` (cumulative tokens processed,
padding included), `flops` (cumulative training FLOPs, analytic), and the metrics logged at that
step (`loss`, `loss_text`, `loss_image`, `loss_total`, `z_loss`, `grad_norm`, `lr`, ...; held-out
ones prefixed `eval_`). Keys are only ever added, never renamed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import SupportsFloat

from moma_jax.safe_io import open_nofollow, refuse_symlink, write_atomic


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None  # a line cut short by a killed process
    return step if isinstance(step, int) else None


def logged_steps(path: Path) -> list[int]:
    """The steps of the readable lines of a metrics.jsonl ([] when there is none)."""
    if not Path(path).is_file():
        return []
    steps = (_step_of(line) for line in Path(path).read_text(errors="replace").splitlines())
    return [s for s in steps if s is not None]


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drops lines past `last_step` (a resumed run re-logs them) and any line a killed process
    left half-written, atomically (never through a symlink)."""
    if not path.exists():
        return
    refuse_symlink(path)
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        step = _step_of(line)
        if step is not None and step <= last_step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a process killed mid-write) is skipped
    with a warning; an unreadable line elsewhere is a ValueError naming it."""
    lines = [(i, x) for i, x in enumerate(Path(path).read_text().splitlines(), 1) if x.strip()]
    out = []
    for n, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines) - 1:
                print(
                    f"warning: {path}:{number}: skipping a torn last line (a run killed while "
                    "writing it)",
                    file=sys.stderr,
                )
                break
            raise ValueError(f"{path}:{number}: not a metrics record ({e})") from None
        out.append(record)
    return out


class MetricWriter:
    """Appends to metrics.jsonl and TensorBoard; prints a progress line to stderr.

    Lines past `start_step` (left by a run killed after its last checkpoint) are dropped first,
    so a resumed run logs each step once.
    """

    def __init__(
        self,
        metrics_file: Path,
        tensorboard_dir: Path,
        start_step: int,
        stop_step: int,
        tokens_per_step: int,
    ):
        from tensorboardX import SummaryWriter

        self.path = metrics_file
        truncate_jsonl(self.path, start_step)
        self.file = open_nofollow(self.path, "a")
        self.tb = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1)
        self.stop_step = stop_step
        self.tty = sys.stderr.isatty()
        self.last = (start_step, time.perf_counter())
        self.tokens_per_step = tokens_per_step  # for the tokens/s in the progress line

    def write(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, float | int):
                self.tb.add_scalar(key, value, step)
        self._progress(step, record)

    def _progress(self, step: int, r: dict) -> None:
        last_step, last_time = self.last
        now = time.perf_counter()
        rate = (step - last_step) * self.tokens_per_step / max(now - last_time, 1e-9)
        self.last = (step, now)
        parts = [f"step {step}/{self.stop_step}"]
        if "loss" in r:
            parts.append(
                f"loss {_num(r['loss'])} (text {_num(r['loss_text'])}, "
                f"image {_num(r['loss_image'])})"
            )
        if "eval_loss" in r:
            parts.append(
                f"held-out {_num(r['eval_loss'])} "
                f"(text {_num(r['eval_loss_text'])}, image {_num(r['eval_loss_image'])})"
            )
        parts.extend(_expert_summary(r))
        if step > last_step and "loss" in r:
            eta = (self.stop_step - step) * (now - last_time) / (step - last_step)
            parts.append(f"{rate / 1e3:.1f}k tok/s, eta {eta:.0f}s")
        line = " | ".join(parts)
        end = "\n" if (not self.tty or "eval_loss" in r or step == self.stop_step) else ""
        print(("\r" if self.tty else "") + line + " " * 4, end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


class NullWriter:
    """The writer of processes other than 0 in a multi-process run: they log nothing."""

    def write(self, step: int, values: dict[str, float]) -> None:
        del step, values

    def close(self) -> None:
        """Nothing was opened."""


def _expert_summary(r: dict) -> list[str]:
    """'image: untaken 12.5%, dropped 0' per expert group, from moe/{group}/* metrics.

    Untaken: eligible tokens no expert took (expert choice leaves some, by design); dropped:
    selections that found no slot (zero for expert choice and one-expert groups; token choice's
    capacity drops). Per-expert load is in metrics.jsonl: expert choice makes it uniform.
    """
    groups = sorted({k.split("/")[1] for k in r if k.startswith("moe/") and "/untaken_frac" in k})
    out = []
    for g in groups:
        dropped = r.get(f"moe/{g}/dropped_frac", 0.0)
        out.append(
            f"{g}: untaken {r[f'moe/{g}/untaken_frac']:.1%}, "
            f"dropped {'0' if dropped == 0 else f'{dropped:.2%}'}"
        )
    return out


def _num(value: float | int | str) -> str:
    """A logged value for the progress line: 3 decimals, or as written ("nan", "inf")."""
    return f"{value:.3f}" if isinstance(value, float | int) else str(value)


def _plain(value: SupportsFloat) -> float | int | str:
    """A JSON value: ints stay ints; floats as floats, non-finite ones as "nan" / "inf" / "-inf"
    (JSON has no NaN/Inf)."""
    if isinstance(value, int):
        return value
    number = float(value)
    return number if math.isfinite(number) else str(number)
