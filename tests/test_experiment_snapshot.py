"""Every registered experiment name resolves to exactly the config it resolved to when the
snapshot was taken (`tests/data/experiment_configs.json`, descriptions left out).

A rewrite of the experiments must keep this passing unchanged. A deliberate change of defaults
(a new config key, a new schedule) regenerates the snapshot in the same commit, whose message
says why: `PYTHONPATH=$PWD python tests/experiment_snapshot.py` (then `git diff tests/data`
shows exactly which names changed which keys).
"""

import json

import pytest
from experiment_snapshot import SNAPSHOT, resolved

from moma_jax import registry

EXPECTED = json.loads(SNAPSHOT.read_text())


def test_no_name_is_lost():
    """Every snapshot name is still bundled. A new name need not be in the snapshot (adding an
    experiment is one function); regenerate the snapshot to guard it too."""
    bundled = {n for n in registry.names() if registry.source(n).split(".")[0] == "experiments"}
    assert set(EXPECTED) <= bundled


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_resolves_to_its_snapshot(name):
    assert resolved(name) == EXPECTED[name]
