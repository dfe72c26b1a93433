"""The bundled experiments: each is a function of a size, declared once per architecture.

`moma_jax.registry` imports this package by name on the first lookup (the library never imports
it); importing it registers every module below. One file per family:

- `dense.py`: the dense baselines and the sizes every architecture is built at (`SIZES`);
- `sparse.py`: mixed-modal MoE (expert choice, Switch, GShard) and Mixture-of-Transformers;
- `moma.py`: modality-aware experts (`moma_4t4i_tiny`, the headline) and upcycling;
- `mod.py`: Mixture-of-Depths in every other layer;
- `attention_experts.py`: attention experts per modality (MoH, SwitchHead);
- `ssm.py`: state-space models (Mamba, Mixture-of-Mamba, MoE-Mamba);
- `aux.py`: the aux-router stages (`{arch}_aux_{size}`, `{arch}_joint_aux_{size}`);
- `ablations.py`: one change each to the tiny comparison;
- `suites.py`: the named comparisons `scripts/compare.py --suite` runs.

To add an experiment, copy a function in the file of its family and give it a new name (or
keep yours in your own module: `--experiments my_module`, README "Adding an experiment").
"""

from experiments import ablations, attention_experts, aux, dense, mod, moma, sparse, ssm, suites

__all__ = [
    "ablations",
    "attention_experts",
    "aux",
    "dense",
    "mod",
    "moma",
    "sparse",
    "ssm",
    "suites",
]
