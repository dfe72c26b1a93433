"""Shared pytest fixtures and session setup."""

import os
from pathlib import Path

from moma_jax import host_memory

host_memory.keep_freed_memory()  # as train.py does, before JAX starts its threads

import jax  # noqa: E402
import pytest  # noqa: E402

from moma_jax.data import ensure_data  # noqa: E402

# JAX's persistent compilation cache: compiled steps are shared across tests, processes and runs.
_CACHE = os.environ.get(
    "MOMA_JAX_COMPILE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "jax")
)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The bundled dataset, prepared on first use (~10 s) and cached across runs."""
    return ensure_data(None)
