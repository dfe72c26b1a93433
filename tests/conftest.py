"""Shared pytest fixtures."""

from pathlib import Path

import pytest

from moma_jax.data import ensure_data


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The bundled dataset, prepared on first use (~10 s) and cached across runs."""
    return ensure_data(None)
