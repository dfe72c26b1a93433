"""Build the bundled mixed-modal dataset (ArrayRecord shards + manifest + image tokenizer).

    python scripts/prepare_data.py --out DIR [--seed 0] [--max-text-chars N] [--force]

Without --out it writes the default bundled dataset that training uses when no data directory
is given ($MOMA_JAX_DATA_DIR, else ~/.cache/moma_jax/data/bundled-v1).
"""

import argparse
import json
import time

from moma_jax.data import default_data_dir, prepare
from moma_jax.data.prepare import DEFAULT_MAX_TEXT_CHARS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(default_data_dir()), help="dataset directory")
    parser.add_argument("--seed", type=int, default=0, help="split, tokenizer and order seed")
    parser.add_argument(
        "--max-text-chars",
        type=int,
        default=DEFAULT_MAX_TEXT_CHARS,
        help="cap on text characters so images are not drowned out",
    )
    parser.add_argument("--force", action="store_true", help="rebuild an existing dataset")
    args = parser.parse_args()
    start = time.perf_counter()
    manifest = prepare(
        args.out, seed=args.seed, max_text_chars=args.max_text_chars, force=args.force
    )
    summary = {
        split: {k: info[k] for k in ("records", "tokens", "modality_shares")}
        for split, info in manifest["splits"].items()
    }
    print(json.dumps(summary, indent=2))
    print(f"dataset in {args.out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
