"""`scripts/prepare_data.py`: the bundled dataset, or a user's corpus with `--input`.

    python scripts/prepare_data.py [--out DIR] [--force]                  # the bundled dataset
    python scripts/prepare_data.py --input PATH... --out DIR [options]    # your own data

Inputs: JSONL documents (`{"text"}` or `{"items": [{"text"}, {"image"}, {"image_codes"}]}`),
folders of images with `name.txt` captions, CSV files of `path,caption`, plain text files
(docs/data.md). Importable as `main(argv)`.

Exit status: 0 done; 2 refused or failed, with one `error: ...` line naming the problem and the
fix (nothing half-written: a rerun resumes or starts again); 130 on Ctrl-C (rerun the same
command to resume: the committed chunks are kept). A full disk is exit 2 (free space and rerun
to resume); a read-only --out is exit 2, unless it holds the finished dataset of these inputs
and options: then it is read, not rewritten, and the exit is 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from moma_jax.data import corpus, default_data_dir, prepare
from moma_jax.data.inputs import BadRecordError
from moma_jax.data.outdir import MANIFEST
from moma_jax.data.prepare import BUNDLED_LARGE_NAME, DEFAULT_MAX_TEXT_CHARS
from moma_jax.units import byte_size


def build_parser() -> argparse.ArgumentParser:
    d = corpus.Options(inputs=())
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Prepare the bundled dataset, or your own corpus with --input, into "
        "ArrayRecord shards with a manifest.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="JSONL files, image folders, CSV (path,caption) or text files",
    )
    p.add_argument("--out", help="dataset directory (default: the bundled dataset's cache)")
    p.add_argument("--force", action="store_true", help="replace an existing dataset")
    p.add_argument("--seed", type=int, default=0, help="split, sample and tokenizer seed")
    g = p.add_argument_group("bundled dataset")
    g.add_argument(
        "--max-text-chars",
        type=int,
        help=f"cap on text characters so images are not drowned out (default "
        f"{DEFAULT_MAX_TEXT_CHARS:,}; 0 for the large bundle: no cap)",
    )
    g.add_argument(
        "--bundle",
        choices=("standard", "large"),
        default="standard",
        help="large: every usable font of matplotlib's wheel and the stdlib's docstrings too "
        "(~12.8M tokens; train on it with --set data.path=bundled-large)",
    )
    g = p.add_argument_group("your corpus (--input)")
    g.add_argument(
        "--text-tokenizer",
        default=d.text_tokenizer,
        help="bytes | bpe:SIZE (SIZE text ids, trained here) | a tokenizer.json or "
        "SentencePiece .model",
    )
    g.add_argument(
        "--image-codes",
        metavar="CODEBOOK:HxW",
        help="images come as image_codes from an external tokenizer with this "
        "codebook size and grid (Chameleon: 8192:32x32)",
    )
    g.add_argument(
        "--image-codebook",
        type=int,
        default=d.image_codebook,
        help="k-means codebook size for image files",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help="every image is centre-cropped and resized to this square size",
    )
    g.add_argument("--image-channels", type=int, choices=(1, 3), default=d.image_channels)
    g.add_argument("--patch-size", type=int, default=d.patch_size)
    g.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    g.add_argument(
        "--shard-size",
        type=byte_size,
        default=d.shard_bytes,
        help="most record bytes per shard (default 64MiB)",
    )
    g.add_argument(
        "--max-doc-bytes",
        type=int,
        default=d.max_doc_bytes,
        help="plain text files are cut into documents of at most this many bytes",
    )
    g.add_argument(
        "--max-memory",
        type=byte_size,
        default=d.max_memory,
        help="bound on the data held in memory at once (default 512MiB)",
    )
    g.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad records (counted and listed in the manifest) instead of "
        "stopping at the first",
    )
    g.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="let image paths in a JSONL or CSV (and links in an image folder) lead outside "
        "the folder of the file that names them (default: such a record is bad)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes (the output is the same for any number)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out = args.out
    try:
        if not args.input:
            default = default_data_dir()
            if args.bundle == "large":
                default = default.parent / BUNDLED_LARGE_NAME
            out = args.out or str(default)
            manifest = prepare(
                out,
                seed=args.seed,
                max_text_chars=args.max_text_chars,
                force=args.force,
                bundle=args.bundle,
            )
        else:
            if not args.out:
                raise ValueError("--out DIR is required with --input.")
            out = args.out
            opts = corpus.Options(
                inputs=tuple(args.input),
                text_tokenizer=args.text_tokenizer,
                image_codes=args.image_codes,
                image_codebook=args.image_codebook,
                image_size=args.image_size,
                image_channels=args.image_channels,
                patch_size=args.patch_size,
                heldout_fraction=args.heldout_fraction,
                seed=args.seed,
                shard_bytes=args.shard_size,
                max_doc_bytes=args.max_doc_bytes,
                max_memory=args.max_memory,
                skip_bad=args.skip_bad,
                allow_outside_paths=args.allow_outside_paths,
            )
            manifest = corpus.prepare_corpus(
                opts, out, workers=args.workers, force=args.force, quiet=args.quiet
            )
    except BadRecordError as e:
        hint = "(--skip-bad skips bad records and lists them in the manifest)"
        _say(f"error: bad record {e}\n{hint}")
        return 2
    except ValueError as e:
        _say(f"error: {e}")
        return 2
    except OSError as e:  # a full or read-only disk, a directory we may not write
        _say(_os_error(e, out, resumes=bool(args.input)))
        return 2
    except KeyboardInterrupt:
        _say("interrupted; rerun the same command to resume")
        return 130
    summary = {
        split: {k: info[k] for k in ("records", "tokens", "modality_shares")}
        for split, info in manifest["splits"].items()
    }
    print(json.dumps(summary, indent=2))
    if "bad_records" in manifest and manifest["bad_records"]["count"]:
        print(f"skipped {manifest['bad_records']['count']} bad records (listed in the manifest)")
    _say(
        f"dataset in {out} ({time.perf_counter() - start:.1f} s); train on it with "
        f"--set data.path={out}",
        sys.stdout,
    )
    return 0


def _os_error(e: OSError, out: str | None, *, resumes: bool) -> str:
    """The `error: ...` line for an OSError: a read-only or full disk names --out and the fix."""
    if not out or e.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return f"error: {e}"
    where = Path(out).expanduser().absolute()
    failed = f"; writing {e.filename} failed" if e.filename and Path(e.filename) != where else ""
    if e.errno == errno.EROFS:
        return (
            f"error: --out {out} is on a read-only file system{failed}. Choose an --out on a "
            "writable disk, or remount it read-write, and rerun."
        )
    existing = next(p for p in (where, *where.parents) if p.exists())
    free = shutil.disk_usage(existing).free / 2**20
    again = "to resume from the chunks already written" if resumes else "to prepare it again"
    return (
        f"error: no space left on the device of --out {out} ({free:.1f} MiB free{failed}); the "
        f"dataset is unfinished (no {MANIFEST}). Free space and rerun the same command {again}, "
        "or choose an --out on a bigger disk."
    )


def _say(text: str, file: TextIO | None = None) -> None:
    """Print `text`, with a file name that is not UTF-8 (surrogate escapes) shown as \\udcXX
    instead of failing on a strict stream."""
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), file=file or sys.stderr)
