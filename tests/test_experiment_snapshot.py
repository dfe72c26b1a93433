"""Every registered experiment name resolves to exactly the config it resolved to when the
snapshot was taken (`tests/data/experiment_configs.json`, descriptions left out).

A rewrite of the experiments must keep this passing unchanged. A deliberate change of defaults
(a new config key, a new schedule) regenerates the snapshot in the same commit, whose message
says why: `PYTHONPATH=$PWD python tests/experiment_snapshot.py`.
"""

import json

import pytest
from experiment_snapshot import SNAPSHOT, resolved

from moma_jax import experiments

EXPECTED = json.loads(SNAPSHOT.read_text())


def test_the_same_names_are_registered():
    assert experiments.names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_resolves_to_its_snapshot(name):
    assert resolved(name) == EXPECTED[name]
