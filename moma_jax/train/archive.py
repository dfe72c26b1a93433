"""A suite's results kept without checkpoints (`compare.py --archive DIR`): for each finished
run, the few files its report reads, so a suite whose seeds were trained on different machines
or days (or whose checkpoints were deleted) is reported again from them, and so the numbers in
docs/ can be recomputed from the runs they came from.

DIR/SUITE/EXPERIMENT/seedS/ (a --root's layout) holds:
- config.json: the run's config, as its last checkpoint saved it;
- metrics.jsonl.gz: every metrics record of the run;
- score.json.gz (the suite's experiments, not their aux stages): the last checkpoint on the
  held-out set as the report scores it (causally through the aux stage where there is one),
  per-document sums included;
- archived.json: the run it came from, when, its last step and the state fingerprint of that
  step, the data manifest saved with it, the code's git commit, and for a run started from
  another (an aux stage, an upcycled run) its init_from.json (the source and step it loaded).

An archived run is written into a temporary folder and renamed into place, and never
overwritten: archiving the same run again (the same state at the same step) does nothing, and
another run where one is archived is an error. Reading one checks nothing against a checkpoint
(there is none): `compare.py` trusts an archived run only after `differences` finds its config
and data equal to what the suite would train now.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.data import content_differences
from moma_jax.overrides import config_diff, to_dict
from moma_jax.train.checkpoint import CheckpointDamagedError, RunCheckpoints, committed_steps
from moma_jax.train.metrics import logged_steps, read_jsonl
from moma_jax.train.reuse import MAY_DIFFER
from moma_jax.train.workdir import Workdir

ARCHIVED = "archived.json"
METRICS = "metrics.jsonl.gz"
SCORE = "score.json.gz"


@dataclasses.dataclass
class ArchivedRun:
    """An archived run, read-only: its config, metrics records and held-out score, as a run's
    report reads them (`analysis.Run` without checkpoints)."""

    workdir: Path
    config: ExperimentConfig
    provenance: dict[str, Any]

    @functools.cached_property
    def records(self) -> list[dict[str, Any]]:
        lines = gzip.decompress((self.workdir / METRICS).read_bytes()).decode().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    @functools.cached_property
    def score(self) -> dict[str, Any] | None:
        """The held-out score saved with it (documents' sums and counts as arrays), or None
        for an aux stage."""
        path = self.workdir / SCORE
        if not path.is_file():
            return None
        score = json.loads(gzip.decompress(path.read_bytes()))
        docs = score["documents"]
        docs["sums"], docs["counts"] = np.asarray(docs["sums"]), np.asarray(docs["counts"])
        return score


def checkpointed_steps(workdir: Path) -> list[int]:
    """The committed checkpoint steps of the run folder `workdir` (read only: no checkpoint is
    opened, no JAX backend started); what `compare.py --status` shows of an unfinished run."""
    return committed_steps(Path(workdir) / "checkpoints")


def is_archived(path: Path) -> bool:
    return (Path(path) / ARCHIVED).is_file()


def open_archived(path: Path) -> ArchivedRun:
    """The archived run in `path`; ValueError naming the file that does not load."""
    path = Path(path)
    try:
        provenance = json.loads((path / ARCHIVED).read_text())
        config = Workdir(path).read_config()
    except (OSError, ValueError, ConfigError) as e:
        raise ValueError(f"{path} is not a readable archived run ({e})") from None
    if config is None or not isinstance(provenance, dict):
        raise ValueError(f"{path} is not a readable archived run (no config.json)")
    return ArchivedRun(path, config, provenance)


def _commit() -> str | None:
    """The git commit of the code running now (+ "-dirty" with uncommitted changes), or None
    outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# The code this process runs: HEAD when it started, not when a run is archived (the checkout
# may move on while a suite trains).
_COMMIT = _commit()


def _finished(src: Path) -> tuple[ExperimentConfig, int, RunCheckpoints]:
    cfg = Workdir(src).read_config()
    if cfg is None:
        raise ValueError(f"{src} holds no run (no config.json): nothing to archive")
    end = cfg.optim.total_steps
    ckpts = RunCheckpoints(Workdir(src).checkpoints)
    if committed_steps(ckpts.directory)[-1:] != [end]:
        raise ValueError(f"{src} has no checkpoint at its last step {end}: not archived")
    if max(logged_steps(Workdir(src).metrics_file), default=0) < end:
        raise ValueError(f"{src} has no metrics up to its last step {end}: not archived")
    return cfg, end, ckpts


def archive_run(src: Path, dest: Path, score: dict[str, Any] | None = None) -> bool:
    """Archives the finished run in `src` into `dest` (with `score`, the report's held-out
    score of it); False if `dest` already holds it (the same state at the same step). A
    ConfigError if `dest` holds another run, a ValueError if `src` is not finished."""
    cfg, end, ckpts = _finished(src)
    try:
        fingerprint = ckpts.state_fingerprint(end)
        manifest = ckpts.manifest(end)
        saved = ckpts.config(end)  # what the state was trained with, not an edited config.json
    except CheckpointDamagedError as e:
        raise ValueError(f"{src}: {e}; not archived") from None
    if _holds(dest, end, fingerprint, src):
        return False
    init_from = Path(src) / "init_from.json"
    provenance = {
        "source": str(src.resolve()),
        "archived": time.strftime("%Y-%m-%d %H:%M:%S"),
        "experiment": cfg.name,
        "step": end,
        "state_fingerprint": fingerprint,
        "manifest": manifest,
        "commit": _COMMIT,
        "init_from": json.loads(init_from.read_text()) if init_from.is_file() else None,
    }

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(to_dict(saved), indent=2))
        records = read_jsonl(Workdir(src).metrics_file)
        text = "".join(json.dumps(r) + "\n" for r in records)
        (tmp / METRICS).write_bytes(gzip.compress(text.encode(), mtime=0))
        if score is not None:
            (tmp / SCORE).write_bytes(gzip.compress(json.dumps(_plain(score)).encode(), mtime=0))
        (tmp / ARCHIVED).write_text(json.dumps(provenance, indent=1) + "\n")

    return _place(dest, write, end, fingerprint, src)


def copy_archived(src: Path, dest: Path) -> bool:
    """Copies the archived run in `src` (another suite's) to `dest`, its provenance saying so
    (`copied_from`); False if `dest` holds it already, a ConfigError if it holds another."""
    run = open_archived(src)
    step, fingerprint = run.provenance.get("step"), run.provenance.get("state_fingerprint")
    if not isinstance(step, int) or not isinstance(fingerprint, list):
        raise ValueError(f"{src / ARCHIVED} names no step and state fingerprint: not copied")
    if _holds(dest, step, fingerprint, src):
        return False

    def write(tmp: Path) -> None:
        for name in ("config.json", METRICS, SCORE):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        provenance = {**run.provenance, "copied_from": str(Path(src).resolve())}
        (tmp / ARCHIVED).write_text(json.dumps(provenance, indent=1) + "\n")

    return _place(dest, write, step, fingerprint, src)


def _place(
    dest: Path, write: Callable[[Path], None], step: int, fingerprint: list[int], src: Path
) -> bool:
    """Writes an archived run into `dest` (`write(folder)`) through a temporary folder beside it
    renamed into place; False if another process placed the same run there meanwhile."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.archiving-", dir=dest.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # as a folder made with mkdir (mkdtemp's is 0700)
        write(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process archived it meanwhile (a folder there, not empty)
            if _holds(dest, step, fingerprint, src):
                return False
            raise
    finally:
        if tmp.exists():  # ours, not renamed: a failed write
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def _holds(dest: Path, step: int, fingerprint: list[int], src: Path) -> bool:
    """Whether `dest` holds this run archived already (the same state at the same step); False
    if nothing is there; a ConfigError if something else is."""
    if not (dest.exists() or dest.is_symlink()):
        return False
    held = open_archived(dest).provenance if is_archived(dest) else {}
    if held.get("step") == step and held.get("state_fingerprint") == fingerprint:
        return True
    raise ConfigError(
        f"{dest} already holds another run than {src} (another state or no archived run); "
        "archive into another folder (--archive), or move that one away first"
    )


def _plain(value: Any) -> Any:
    """`value` with NumPy arrays and scalars as JSON's lists and numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def differences(run: ArchivedRun, cfg: ExperimentConfig, manifest: dict[str, Any]) -> list[str]:
    """What keeps archived `run` from standing for the run `cfg` would train on the data whose
    manifest is `manifest` ('key: archived -> now' lines, and the data): empty when it may.
    `cfg` as training resolves it (`runtime.with_data_shares`)."""
    out = [] if run.config.name == cfg.name else [f"experiment: {run.config.name} -> {cfg.name}"]
    out += config_diff(run.config, cfg, MAY_DIFFER.__contains__)
    if differ := content_differences(run.provenance.get("manifest", {}), manifest):
        out.append(f"the data (its manifest differs from the data's here in {', '.join(differ)})")
    return out
