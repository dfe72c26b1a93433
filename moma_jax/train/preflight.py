"""Checks of a config against the machine, before anything is compiled or written: what XLA
would otherwise answer with an abort or a crash deep in compilation.

- model.attention=pallas (a Triton kernel) off a GPU, or over more than one device (the kernel
  is not partitioned over a mesh): refused, naming the fix.
- float16 on the CPU backend (XLA's CPU dot kernels do not support it for every op the model
  uses; bfloat16 and float32 work): refused, naming the key and the fix.
- Memory: the train state alone (parameters, their gradients, the optimizer's moments) is a
  lower bound on what a step needs; a model whose lower bound exceeds the memory available (the
  host's available RAM on CPU, the devices' byte limits on an accelerator) is refused, naming
  the size keys, instead of letting the allocator abort the process.
"""

from __future__ import annotations

import math

import jax

from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.model.attention import check_backend


def check(cfg: ExperimentConfig) -> None:
    check_backend(cfg.model.attention)
    if cfg.model.attention == "pallas" and jax.device_count() > 1:
        raise ConfigError(
            f"model.attention=pallas runs on one device for now (the kernel is not partitioned "
            f"over a mesh; this run has {jax.device_count()}): use --set model.attention=xla"
        )
    check_dtypes(cfg)
    check_memory(cfg)


def check_dtypes(cfg: ExperimentConfig) -> None:
    if jax.default_backend() != "cpu":
        return
    for key in ("param_dtype", "compute_dtype"):
        if getattr(cfg.model, key) == "float16":
            raise ConfigError(
                f"model.{key}=float16 is not supported on the CPU backend (XLA's CPU kernels "
                f"lack float16 for some of the model's ops); use --set model.{key}=bfloat16 "
                "or float32 here, and float16 on a GPU"
            )


def state_bytes(cfg: ExperimentConfig) -> int:
    """Parameters and their gradients, plus the optimizer state as `make_optimizer` builds it
    (AdamW's moments in the parameters' dtype; none for frozen parameters), from shapes only."""
    from moma_jax.train.state import abstract_params, make_optimizer

    _, params = abstract_params(cfg)
    opt_state = jax.eval_shape(make_optimizer(cfg.optim, cfg.model.aux_routers).init, params)

    def nbytes(tree) -> int:
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return 2 * nbytes(params) + nbytes(opt_state)


def available_bytes() -> int | None:
    """Memory the run may use: the devices' byte limits, or the host's available RAM on CPU
    (MemAvailable of /proc/meminfo; None where there is none: the check is skipped)."""
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
    if all(limits):
        return sum(int(x) for x in limits if x) * jax.process_count()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # no /proc (not Linux): the check is skipped
        return None
    return None


def check_memory(cfg: ExperimentConfig) -> None:
    need, have = state_bytes(cfg), available_bytes()
    if have is None or need <= have:
        return
    m = cfg.model
    raise ConfigError(
        f"the model does not fit: its train state alone (parameters, gradients and AdamW "
        f"moments, before any activation) needs {need / 2**30:,.1f} GiB and this machine has "
        f"{have / 2**30:,.1f} GiB available. Shrink model.d_model={m.d_model}, "
        f"model.n_layers={m.n_layers}, model.ffn_hidden or the number of experts "
        "(model.moe.*), or run on more devices"
    )
