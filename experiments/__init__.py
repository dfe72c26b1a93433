"""Named experiments. Importing this package registers every experiment module below."""

from experiments import dense, sparse  # noqa: F401  (registers by import)
