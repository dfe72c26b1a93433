"""Command lines for end-to-end tests: a tiny experiment shrunk so a run takes seconds."""

SMALL_KEYS = (
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "data.seq_len=128",
    "data.batch_size=8",
    "optim.total_steps=40",
    "optim.warmup_steps=2",
    "run.eval_batches=2",  # the tiny experiments hold out 30 batches (>= 100k tokens)
)


def sets(*keys: str) -> list[str]:
    """['--set', k1, '--set', k2, ...]."""
    return [arg for key in keys for arg in ("--set", key)]


def small(*keys: str) -> list[str]:
    """--set arguments for the shrunk shape plus `keys` (later keys win)."""
    return sets(*SMALL_KEYS, *keys)
