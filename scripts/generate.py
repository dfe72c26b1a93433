"""Sample from a run: python scripts/generate.py --workdir DIR --prompt TEXT [--image PATH]
[--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--out DIR]."""

import sys

from moma_jax import host_memory
from moma_jax.commands.generate import main

if __name__ == "__main__":
    host_memory.keep_freed_memory()
    sys.exit(main())
