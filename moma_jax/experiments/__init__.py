"""The bundled named experiments, and the lookup every entry point uses.

Importing this package registers every experiment module below (`dense`, `sparse`, `aux`) in
`moma_jax.registry`; `get`, `names` and `describe` then see them. The registry never imports
this package: the import direction is experiments -> registry, one way.

Your own experiments live in your own module (see README "Adding an experiment"):
`train.py --experiments my_module --exp my_exp` imports it before the lookup.
"""

from moma_jax.experiments import ablations, aux, dense, sparse, suites
from moma_jax.registry import describe, get, load_module, names, register

__all__ = [
    "ablations", "aux", "dense", "describe", "get", "load_module", "names", "register",
    "sparse", "suites",
]  # fmt: skip
