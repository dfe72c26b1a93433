"""Command lines the commands suggest when they refuse a run: the library's errors carry the
data (experiment names, directories), and only the commands know how they are launched."""

from moma_jax.model.aux_router import NoAuxRoutersError


def train_aux_routers(error: NoAuxRoutersError) -> str:
    """The commands that train the aux routers a refused run lacks."""
    return (
        f"train them: python scripts/train.py --exp {error.posthoc} --init-from {error.workdir} "
        f"(or train {error.joint} from scratch)"
    )
