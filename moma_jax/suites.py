"""Named comparison suites: experiments trained on the same data, tokens, schedule and seeds,
then compared at equal FLOPs (`python scripts/compare.py --suite NAME`, docs/comparison.md).

This is the mechanism; the bundled suites are declared in `experiments/suites.py`, loaded with
the bundled experiments. Seed s of a suite sets `run.param_seed`, `run.routing_seed` and
`data.seed` to s for every experiment, so each sparse run is compared with the dense run of the
same seed.
"""

from __future__ import annotations

import dataclasses
import difflib

from moma_jax.errors import ConfigError
from moma_jax.registry import load_bundled


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


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
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
