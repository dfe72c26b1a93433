"""Modality ids and names: the bottom of the import graph (config, model, losses, flops and data
all read them here).

A token's modality decides its expert group (MoMa), its untied weights (MoT) and which
per-modality loss it counts in. Ids index `MODALITY_NAMES`; new modalities (audio, ...) append.
"""

TEXT = 0
IMAGE = 1
MODALITY_NAMES: tuple[str, ...] = ("text", "image")
N_MODALITIES = len(MODALITY_NAMES)
