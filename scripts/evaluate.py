"""Held-out loss of a run: python scripts/evaluate.py --workdir DIR [--step N]
[--routing teacher_forced|causal] [--leak] [--json]."""

import sys

from moma_jax import host_memory
from moma_jax.commands.evaluate import main

if __name__ == "__main__":
    host_memory.keep_freed_memory()
    sys.exit(main())
