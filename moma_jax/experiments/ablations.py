"""Ablations of the tiny comparison (docs/reproduction.md, "Why dense wins at the tiny size"):
one change each to dense_tiny and moma_4t4i_tiny, run as suites by `scripts/compare.py`.

- `_c2`: expert-choice capacity 2 (the EC paper's default; ~2 experts per token, so ~2x the FFN
  FLOPs: eta puts it on the FLOPs axis) -- fewer tokens that no expert takes;
- `_lrhalf` / `_lrdouble`: peak LR 1.5e-3 / 6e-3 instead of 3e-3, for the sparse model;
- `_prenorm`: pre-norm (Llama) instead of Swin post-norm, for both;
- `_wide`: 2 layers x d=192 (6 heads of 32) instead of 4 x 128, for both: wider at about the
  same FLOPs per token.
"""

import dataclasses
from collections.abc import Callable

from moma_jax.config import ExperimentConfig
from moma_jax.registry import get, register


def _model(**keys) -> Callable[[ExperimentConfig], ExperimentConfig]:
    return lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, **keys))


def _moe(**keys) -> Callable[[ExperimentConfig], ExperimentConfig]:
    return lambda c: _model(moe=dataclasses.replace(c.model.moe, **keys))(c)


def _lr(peak: float) -> Callable[[ExperimentConfig], ExperimentConfig]:
    return lambda c: dataclasses.replace(c, optim=dataclasses.replace(c.optim, peak_lr=peak))


VARIANTS: dict[str, tuple[tuple[str, ...], Callable, str]] = {
    "c2": (("moma_4t4i", "moe_8x"), _moe(capacity=2.0), "expert-choice capacity 2"),
    "lrhalf": (("moma_4t4i",), _lr(1.5e-3), "peak LR 1.5e-3"),
    "lrdouble": (("moma_4t4i",), _lr(6e-3), "peak LR 6e-3"),
    "prenorm": (("dense", "moma_4t4i"), _model(norm_order="pre"), "pre-norm"),
    "wide": (("dense", "moma_4t4i"), _model(n_layers=2, d_model=192, n_heads=6), "2 x 192"),
}


def _register(arch: str, variant: str) -> None:
    _, change, summary = VARIANTS[variant]
    base, name = f"{arch}_tiny", f"{arch}_{variant}_tiny"

    def experiment() -> ExperimentConfig:
        return change(get(base))

    experiment.__doc__ = (
        f"{base} with {summary} (an ablation of the tiny comparison).\n\n"
        f"Run: python scripts/train.py --exp {name}\n"
        "Shows: with its partner in the ablation suites (compare.py --suite ablation_...), "
        "whether this change lets the sparse model beat dense at the tiny size."
    )
    experiment.__name__ = name
    register(name)(experiment)


for _variant, (_archs, *_rest) in VARIANTS.items():
    for _arch in _archs:
        _register(_arch, _variant)
