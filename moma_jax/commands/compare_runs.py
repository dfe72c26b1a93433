"""Where a suite's runs are and whether they may be pooled: a run's folder under the root or,
where the root has none, in the archive (`train.archive`); the checks that the report pools only
seeds of the same thing on the same data and held-out set; the data regime the dense run saw;
the seeds and experiments a command names (`--seed`, `--experiment`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moma_jax import budgets
from moma_jax import data as data_lib
from moma_jax.analysis import Run, load_run
from moma_jax.config import ConfigError
from moma_jax.data import content_differences
from moma_jax.overrides import config_diff
from moma_jax.suites import Suite
from moma_jax.train.archive import ArchivedRun, is_archived, open_archived
from moma_jax.train.reuse import MAY_DIFFER

# The keys a seed sets (compare.seed_keys): the only ones the seeds of an experiment differ in.
SEED_KEYS = frozenset({"run.param_seed", "run.routing_seed", "data.seed"})
_SEEDS_MAY_DIFFER = MAY_DIFFER | SEED_KEYS


def run_dir(root: Path, suite: Suite, exp: str, seed: int) -> Path:
    return root / suite.name / exp / f"seed{seed}"


def source_dir(root: Path, suite: Suite, exp: str, seed: int) -> Path:
    """Where upcycled experiment `exp`'s source run lives: ROOT/SUITE/{exp}.source/seedS."""
    return run_dir(root, suite, f"{exp}.source", seed)


def locate(root: Path, suite: Suite, exp: str, seed: int, archive: Path | None = None) -> Path:
    """The run's folder under `root`; where `root` has none and `archive` holds the run, the
    archived one."""
    here = run_dir(root, suite, exp, seed)
    if archive is None or here.is_dir():
        return here
    there = run_dir(archive, suite, exp, seed)
    return there if is_archived(there) else here


def open_run(path: Path) -> Run | ArchivedRun:
    """The run in `path`: an archived one, or a run folder (`analysis.load_run`)."""
    return open_archived(path) if is_archived(path) else load_run(path)


def _manifest(run: Run | ArchivedRun) -> dict[str, Any] | None:
    """The data manifest saved with the run's last checkpoint (an archived run's, as archived);
    None where it has none."""
    if isinstance(run, ArchivedRun):
        return run.provenance.get("manifest")
    steps = run.steps
    return run.checkpoints.manifest(steps[-1]) if steps else None


def check_comparable(
    opened: dict[tuple[str, int], Run | ArchivedRun], suite: Suite, seeds: int
) -> None:
    """A ValueError naming the run and what differs where the report would pool runs that are
    not seeds of the same thing: the seeds of an experiment trained with configs that differ
    outside the seed keys (and the keys a copied run may differ in), or any run trained on
    other data (the content of the manifest saved with it) than the dense seed 0's. Runs from
    --root and from an archive are checked alike: seeds trained apart (`--seed`) meet here."""
    for exp in suite.experiments:
        first = opened[(exp, 0)]
        for s in range(1, seeds):
            other = opened[(exp, s)]
            diff = config_diff(first.config, other.config, _SEEDS_MAY_DIFFER.__contains__)
            if diff:
                raise ValueError(
                    f"{other.workdir} was trained with another config than {first.workdir} "
                    f"({'; '.join(diff)}): the report would pool them as seeds. Train it again "
                    "with the suite's config (--restart, or out of the archive), or report them "
                    "in suites of their own"
                )
    reference = opened[(suite.experiments[0], 0)]
    # The records' digest is compared only where both manifests hold one, so a reference
    # without it would let two runs with different digests through: the first run that has
    # one is the reference for it.
    digested = [r for r in opened.values() if "records_digest" in (_manifest(r) or {})]
    for ref in (reference, *digested[:1]):
        data = _manifest(ref)
        for run in opened.values():
            mine = _manifest(run)
            if (
                data is not None
                and mine is not None
                and (differ := content_differences(data, mine))
            ):
                raise ValueError(
                    f"{run.workdir} was trained on other data than {ref.workdir} (the manifests "
                    f"saved with them differ in {', '.join(differ)}): their losses are not "
                    "comparable; train it again on the suite's data"
                )


def same_heldout_set(scored: dict[tuple[str, int], dict[str, Any]]) -> dict[str, int]:
    """The held-out set every run was scored on ({"batches", "targets"}); a ValueError naming
    the runs if they differ (e.g. finished under another run.eval_batches): their losses would
    not be comparable."""
    sets = {(r["batches"], r["tokens"]): key for key, r in scored.items()}
    if len(sets) > 1:
        seen = ", ".join(
            f"{e}/seed{s}: {b} batches, {t:,} targets" for (b, t), (e, s) in sets.items()
        )
        raise ValueError(
            f"the suite's runs were evaluated on different held-out sets ({seen}); give every "
            "run the same run.eval_batches and data.seq_len/batch_size (rerun the odd ones with "
            "--restart, or report them in a suite of their own)"
        )
    (batches, targets), _ = sets.popitem()
    return {"batches": batches, "targets": targets}


def archived_runs(
    root: Path, suite: Suite, seeds: int, archive: Path | None
) -> dict[str, str | None]:
    """{"EXP/seedS": the commit of the code that trained it} for each run read from the
    archive."""
    out: dict[str, str | None] = {}
    for exp in suite.experiments:
        for s in range(seeds):
            run = open_run(locate(root, suite, exp, s, archive))
            if isinstance(run, ArchivedRun):
                out[f"{exp}/seed{s}"] = run.provenance.get("commit")
    return out


def data_regime(
    root: Path, suite: Suite, dense: str, tokens: float, archive: Path | None = None
) -> dict[str, Any]:
    """Token slots and real (non-padding) tokens trained on per dense-model parameter, and
    epochs of the training split (real tokens / the split's tokens)."""
    run = open_run(locate(root, suite, dense, 0, archive))
    cfg = run.config
    if isinstance(run, ArchivedRun):  # the data it was trained on, wherever this runs
        manifest = run.provenance["manifest"]
    else:
        manifest = data_lib.load_manifest(data_lib.ensure_data(cfg.data.path or None))
    train_tokens = manifest["splits"]["train"]["tokens"]
    n = budgets.dense_params(cfg)
    real = tokens * budgets.real_token_share(cfg)
    return {
        "tokens": tokens,
        "real_tokens": real,
        "dense_params": n,
        "tokens_per_dense_param": tokens / n,
        "real_tokens_per_dense_param": real / n,
        "train_split_tokens": train_tokens,
        "epochs": real / train_tokens,
    }


def chosen_experiments(
    suite: Suite, chosen: list[str] | None, report_only: bool
) -> list[str] | None:
    """The experiments `--experiment` names, in the suite's order, or None for every one."""
    if not chosen:
        return None
    if report_only:
        raise ConfigError("--experiment trains; --report-only trains none: give one of them")
    if unknown := sorted(set(chosen) - set(suite.experiments)):
        raise ConfigError(
            f"--experiment {', '.join(unknown)}: not in suite {suite.name} "
            f"({', '.join(suite.experiments)}; a module that registers experiments is "
            "--experiments MODULE)"
        )
    return [e for e in suite.experiments if e in chosen]


def chosen_seeds(chosen: list[int] | None, seeds: int, report_only: bool) -> list[int] | None:
    """The seeds `--seed` names, in order, or None for every seed; ConfigError for a seed the
    suite does not have, or with --report-only."""
    if not chosen:
        return None
    if report_only:
        raise ConfigError("--seed trains one seed; --report-only trains none: give one of them")
    for s in chosen:
        if not 0 <= s < seeds:
            raise ConfigError(f"--seed {s}: the suite runs seeds 0..{seeds - 1} (--seeds {seeds})")
    return sorted(set(chosen))
