"""Keep the host allocator from returning freed buffers to the OS between steps.

On the CPU backend XLA allocates every step's large buffers (activations, gradients, new
parameters) with the C library's `malloc`. glibc serves any block above 32 MiB (and, by its
dynamic threshold, many smaller ones) with a fresh `mmap` and unmaps it on `free`, so each step
touches every large buffer's pages for the first time again: a minor page fault and a zeroed
page per 4 KiB. On the 2-core benchmark machine that was about a third of the dense step
(docs/benchmarks.md). TPU VM images avoid it by preloading TCMalloc; this does the same job
with glibc's own `mallopt`, applied once at start-up by the training and benchmark commands,
before JAX starts its backend and its threads:

- `M_ARENA_MAX = 1`: XLA's worker threads allocate from the one main heap (a thread's own
  arena is a set of 64 MiB mappings that glibc shrinks, and so faults again, as blocks free);
- `M_MMAP_MAX = 0`: serve every block from the heap, never from a private mapping;
- `M_TRIM_THRESHOLD` at its maximum: never give the heap's free top back to the OS;
- `M_TOP_PAD` 256 MiB: grow the heap in large steps.

The process keeps its peak host memory for its life (what a training run holds anyway).
It is applied only on CPU-only hosts: where a JAX accelerator plugin is installed (CUDA, ROCm,
TPU) the host allocator serves the runtime's many threads and pinned buffers, and these settings
were never measured there (one GPU benchmark with them did not finish in its time limit; the
cause was not isolated). `MOMA_JAX_HOST_MALLOC=keep` applies them anyway, `=default` never. The
call is a no-op where the C library has no `mallopt` (macOS, musl) and under a preloaded
allocator (`LD_PRELOAD` naming tcmalloc or jemalloc), which already keep their memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import pkgutil

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TOP_PAD_BYTES = 256 << 20
INT_MAX = 2**31 - 1
applied = "not called"  # what the last keep_freed_memory() did (the benchmarks report it)


def keep_freed_memory() -> str:
    """Applies the settings above; returns what it did ("kept", or why it did nothing)."""
    global applied
    applied = _apply()
    return applied


def accelerator_plugins() -> list[str]:
    """Installed JAX accelerator plugins (jax_cuda*, jax_rocm*, libtpu, jax_plugins.*)."""
    names = [
        m.name
        for m in pkgutil.iter_modules()
        if m.name.startswith(("jax_cuda", "jax_rocm", "libtpu"))
    ]
    with contextlib.suppress(ImportError):  # no namespace package: no plugin installed that way
        import jax_plugins  # type: ignore[import-not-found]

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    return sorted(set(names))


def _apply() -> str:
    mode = os.environ.get("MOMA_JAX_HOST_MALLOC", "auto")
    if mode == "default":
        return "default: MOMA_JAX_HOST_MALLOC=default"
    cpu_only = os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    plugins = [] if cpu_only else accelerator_plugins()
    if mode != "keep" and plugins:
        return f"default: accelerator plugins {plugins} (MOMA_JAX_HOST_MALLOC=keep to apply)"
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or "jemalloc" in preload:
        return f"default: LD_PRELOAD={preload}"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"default: no mallopt in the C library ({name})"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = (
        (M_ARENA_MAX, 1),
        (M_MMAP_MAX, 0),
        (M_TRIM_THRESHOLD, INT_MAX),
        (M_TOP_PAD, TOP_PAD_BYTES),
    )
    failed = [param for param, value in settings if mallopt(param, value) != 1]
    return f"default: mallopt refused {failed}" if failed else "kept"
