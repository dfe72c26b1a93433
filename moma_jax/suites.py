"""Named comparison suites: experiments trained on the same data, tokens, schedule and seeds,
then compared at equal FLOPs (`python scripts/compare.py --suite NAME`, docs/comparison.md).

This is the mechanism; the bundled suites are declared in `experiments/suites.py`, loaded with
the bundled experiments. Seed s of a suite sets `run.param_seed`, `run.routing_seed` and
`data.seed` to s for every experiment, so each sparse run is compared with the dense run of the
same seed.

Budgets: by default every run trains the steps of its own config. `match_flops` trains every
experiment to the dense run's total training FLOPs (its steps derived from its own FLOPs per
step, with its own full schedule), so a model with fewer or more FLOPs per step (MoD, capacity 2)
competes at equal compute. `tokens_per_param` runs the whole suite once per budget (real,
non-padding training tokens per dense parameter; each budget its own runs with its own schedule,
in ROOT/SUITE/tpp{B}/...), for scaling fits across budgets (`moma_jax.scaling`). `upstream`
trains an upcycled experiment's source run first and counts its FLOPs (`Upstream`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence

from moma_jax.errors import ConfigError
from moma_jax.registry import load_bundled


@dataclasses.dataclass(frozen=True)
class Upstream:
    """How an upcycled experiment of a suite starts: from a run of `source` (its own run in the
    suite, ROOT/SUITE/{experiment}.source/seedS, with its own full schedule) trained to
    `fraction` of the dense run's total training FLOPs; the upcycled run (`run.init_from` that
    run) then trains to the rest, so its FLOPs axis, which counts the source's FLOPs
    (`train/upcycle.py`), ends where dense's does."""

    source: str
    fraction: float


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    experiments: tuple[str, ...]  # the first is the dense reference
    seeds: int
    overrides: tuple[str, ...] = ()  # applied to every run of the suite
    description: str = ""
    # After each run whose routers rank whole routing groups, train its post-hoc aux-router
    # stage (`{arch}_aux_{size}`, experiments/aux.py), so the report has causal losses.
    aux_stages: bool = False
    match_flops: bool = False  # every run to dense's total training FLOPs (module docstring)
    tokens_per_param: tuple[float, ...] = ()  # one run of the suite per budget
    # (experiment, its upstream run): upcycled experiments, each at dense's total FLOPs with
    # its source run's FLOPs counted (see `Upstream`).
    upstream: tuple[tuple[str, Upstream], ...] = ()

    def upstream_of(self, experiment: str) -> Upstream | None:
        return dict(self.upstream).get(experiment)

    def at_budget(self, tokens_per_param: float, keys: Sequence[str]) -> Suite:
        """The suite at one of its budgets, `keys` setting its schedule; its runs live in
        ROOT/SUITE/tpp{B}/."""
        return dataclasses.replace(
            self,
            name=f"{self.name}/tpp{tokens_per_param:g}",
            overrides=(*self.overrides, *keys),
            tokens_per_param=(),
        )


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    for exp, up in suite.upstream:
        if exp not in suite.experiments[1:] or not 0 < up.fraction < 1:
            raise ConfigError(
                f"suite {suite.name}: upstream of {exp!r} needs a non-reference experiment of "
                f"the suite and a fraction in (0, 1), got {up.fraction}"
            )
    SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    """The named suite; unknown names are answered with the close matches."""
    load_bundled()
    if name not in SUITES:
        close = difflib.get_close_matches(name, list(SUITES), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown suite {name!r}{hint} Suites: {', '.join(sorted(SUITES))}")
    return SUITES[name]
