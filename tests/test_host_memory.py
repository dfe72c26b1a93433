"""`host_memory.keep_freed_memory`: a freed large buffer is reused without new page faults."""

import json
import subprocess
import sys

import pytest

from moma_jax import host_memory

# malloc + memset + free of 64 MiB, as XLA's CPU runtime does with a step's buffers (NumPy
# would ask for huge pages, which hides the per-page cost).
PROBE = """
import ctypes, json, resource, sys
from moma_jax import host_memory
state = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else "untouched"
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(64 << 20)
    ctypes.memset(buffer, 1, 64 << 20)
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults}))
"""


def probe(mode: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    default = probe("default")
    kept = probe("keep")
    if kept["state"] != "kept":
        pytest.skip(f"allocator not glibc here: {kept['state']}")
    # glibc's default maps each 64 MiB buffer afresh: every call faults in all its pages.
    assert min(default["faults"][1:]) > pages // 2, default
    # Kept: the first call grows the heap; later calls reuse those pages.
    assert max(kept["faults"][1:]) < pages // 20, kept


def test_opt_out_leaves_the_allocator(monkeypatch):
    monkeypatch.setenv("MOMA_JAX_HOST_MALLOC", "default")
    assert host_memory.keep_freed_memory().startswith("default: MOMA_JAX_HOST_MALLOC")
    assert host_memory.applied.startswith("default")


def test_hosts_with_an_accelerator_plugin_keep_their_allocator(monkeypatch):
    monkeypatch.delenv("MOMA_JAX_HOST_MALLOC", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: ["jax_cuda12_plugin"])
    assert "accelerator plugins ['jax_cuda12_plugin']" in host_memory.keep_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # a CPU run on a GPU host applies them
    assert host_memory.keep_freed_memory().startswith(("kept", "default: no mallopt"))
