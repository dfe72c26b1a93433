"""Prepare a user's corpus: streaming, in parallel worker processes, resumable, the same shards
for any number of workers.

    python scripts/prepare_data.py --input PATH... --out DIR [options]   (see that script)

1. **Tokenizers first.** When a BPE or the k-means image codebook must be trained, one streaming
   pass draws a seeded reservoir sample of documents (bounded by `max_memory`) and trains them;
   they are written into DIR before any shard.
2. **Chunks.** The inputs are read in order (`inputs.scan`) and cut into chunks of about
   `chunk_bytes` of input; chunk k is the same whatever the number of workers. A worker
   tokenizes chunk k into `train-k-j` / `heldout-k-j` ArrayRecord shards of at most
   `shard_bytes` of records each (written under a temporary name, renamed when closed), then
   writes `chunks/k.json` (its counts): that file is the chunk's commit.
3. **Resume.** `prepare_state.json` records the options and every input file's size and mtime. A
   rerun with the same ones skips the committed chunks (after Ctrl-C or a kill) and, when the
   dataset is finished, does nothing; with other ones an unfinished preparation restarts from
   scratch (a finished dataset needs `--force`).
4. **Manifest last.** Written (atomically) only after every chunk committed, from the chunks'
   counts in chunk order, so it never names a missing or half-written shard.

DIR is locked while a preparation writes it (a second one is refused at once), and restarting or
`--force` removes only what a preparation wrote: a DIR holding anything else, or overlapping an
input, is refused before anything is touched (`outdir.py`).

A full disk stops the preparation with an OSError (ENOSPC) after removing the chunk it was
writing: free space and rerun to resume. On a read-only disk only a finished DIR of these inputs
and options is returned (it is read, nothing is written); anything else is an OSError (EROFS).

Each document is held out with probability `heldout_fraction` by a seeded hash of its index in
the input order. Bad records (inputs.BadRecordError) stop the preparation, naming the file and the
line, or with `skip_bad` are counted and listed in the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from moma_jax.data import inputs, outdir, records, text_tokenizers
from moma_jax.data.corpus_chunks import LISTED_BAD, run_chunks
from moma_jax.data.corpus_options import Options
from moma_jax.data.corpus_tokenizers import Tokenizers, load_tokenizers, make_tokenizers
from moma_jax.data.image_tokenizer import ImageTokenizer
from moma_jax.data.outdir import CHUNKS, MANIFEST, STATE, TOKENIZER_FILE, TOKENIZERS
from moma_jax.modality import MODALITY_NAMES


def _fingerprint(opts: Options, paths: list[Path]) -> dict[str, Any]:
    """The options and every input file's size and mtime, as saved in JSON (lists, not tuples:
    a rerun compares it with the saved one)."""
    files = [
        {"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
        for p in inputs.input_files(paths)
    ]
    return json.loads(json.dumps({"options": dataclasses.asdict(opts), "files": files}))


class Progress:
    """Documents/s and MB/s on stderr, at most twice a second."""

    def __init__(self, total_bytes: int, enabled: bool = True):
        self.total, self.enabled = total_bytes, enabled
        self.start = self.last = time.perf_counter()
        self.docs = self.bytes = self.bad = 0
        self.open_line = False  # a progress line is on the screen, not yet ended

    def interrupted(self) -> None:
        """End the open line, so that an error or Ctrl-C prints on a line of its own."""
        if self.open_line:
            print(file=sys.stderr)

    def add(self, result: dict[str, Any], final: bool = False) -> None:
        self.docs += result["documents"]
        self.bytes += result["input_bytes"]
        self.bad += result["bad_count"]
        now = time.perf_counter()
        if self.enabled and (final or now - self.last > 0.5):
            self.last, self.open_line = now, not final
            dt = max(now - self.start, 1e-9)
            print(
                f"\r[prepare] {self.docs:,} docs  "
                f"{self.bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB"
                f"  {self.docs / dt:,.0f} docs/s  {self.bytes / 1e6 / dt:,.2f} MB/s"
                f"  bad {self.bad}",
                end="\n" if final else "",
                file=sys.stderr,
                flush=True,
            )


def prepare_corpus(
    opts: Options,
    out_dir: str | Path,
    *,
    workers: int = 1,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Prepare the corpus of `opts` into `out_dir`; returns the manifest (see the module doc).
    Everything that can be refused is refused before `out_dir` is touched."""
    opts.check()
    if workers < 1:
        raise ValueError(f"--workers {workers}: at least 1.")
    paths = [Path(p).expanduser().absolute() for p in opts.inputs]
    for p in paths:
        inputs.check_input(p)
    kind, tokenizer_file = text_tokenizers.parse_choice(opts.text_tokenizer)
    if kind == "file":
        text_tokenizers.check_file(tokenizer_file)
    out = Path(out_dir).expanduser().absolute()
    outdir.check_target(out, paths + ([tokenizer_file] if kind == "file" else []))
    outdir.refuse_foreign(out)  # before the lock file is created in it
    out.mkdir(parents=True, exist_ok=True)
    with outdir.locked(out) as writable:
        outdir.refuse_foreign(out)  # again: written meanwhile by a run that held the lock
        return _prepare(opts, paths, out, writable, workers=workers, force=force, quiet=quiet)


def _prepare(
    opts: Options,
    paths: list[Path],
    out: Path,
    writable: bool,
    *,
    workers: int,
    force: bool,
    quiet: bool,
) -> dict[str, Any]:
    """`prepare_corpus` in a locked `out` holding nothing foreign (on a read-only file system,
    not `writable`, only a finished dataset is returned: nothing else is tried)."""
    log = (lambda m: None) if quiet else (lambda m: print(f"[prepare] {m}", file=sys.stderr))
    fingerprint = _fingerprint(opts, paths)
    same = outdir.read_json(out / STATE) == fingerprint
    if (out / MANIFEST).is_file():
        if same and not force:
            log(f"{out} is already prepared from these inputs and options")
            return json.loads((out / MANIFEST).read_text())
        if not force:
            raise ValueError(
                f"{out} already holds a dataset prepared from other inputs or options. Pass "
                "--force to replace it, or choose another --out."
            )
    if not writable:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out))
    if same and not (out / MANIFEST).is_file():
        done = _committed_chunks(out)
        if done:
            log(f"resuming: {len(done)} chunks already committed")
    else:
        if (out / STATE).is_file() and not (out / MANIFEST).is_file():
            log(f"{out}: an unfinished preparation with other inputs/options; starting again")
        outdir.remove_ours(out)
        done = set()
        outdir.write_json(out / STATE, fingerprint)
    (out / CHUNKS).mkdir(exist_ok=True)
    start = time.perf_counter()

    if (out / TOKENIZERS).is_file():
        tok = load_tokenizers(opts, out)
    else:
        tok = make_tokenizers(opts, paths, out, log)
        outdir.write_json(out / TOKENIZERS, {"text": tok.text.manifest()})

    progress = Progress(sum(f["bytes"] for f in fingerprint["files"]), enabled=not quiet)
    results: dict[int, dict[str, Any]] = {}

    def collect(result: dict[str, Any]) -> None:
        results[result["chunk"]] = result
        progress.add(result)

    try:
        run_chunks(opts, paths, out, tok, done, workers, collect)
    except BaseException:
        progress.interrupted()
        # The pool's workers are stopped (joined): the chunks they were writing leave no
        # temporary file taking a full disk's space. The committed chunks stay.
        with contextlib.suppress(OSError):
            _committed_chunks(out)
        raise
    progress.add({"documents": 0, "input_bytes": 0, "bad_count": 0}, final=True)
    manifest = _manifest(opts, tok, [results[k] for k in sorted(results)], fingerprint)
    manifest["records_digest"] = records.records_digest(out, manifest["splits"])
    manifest["prepare_seconds"] = round(time.perf_counter() - start, 2)
    outdir.write_json(out / MANIFEST, manifest)
    return manifest


def _committed_chunks(out: Path) -> set[int]:
    """The chunks a stopped preparation committed (all their shards in place). Everything else
    it wrote (temporary files, shards of uncommitted chunks) is removed: the rerun redoes it."""
    done = set()
    for name in os.listdir(out / CHUNKS) if (out / CHUNKS).is_dir() else []:
        k = outdir.chunk_number(name)
        shards = _chunk_shards(outdir.read_json(out / CHUNKS / name))
        if k is not None and shards is not None and all((out / f).is_file() for f in shards):
            done.add(k)
        else:  # a temporary file, or a commit whose shards are gone
            (out / CHUNKS / name).unlink()
    for name in os.listdir(out):
        k = outdir.shard_chunk(name)
        if outdir.is_temp(name) or (k is not None and k not in done):
            (out / name).unlink()
    return done


def _chunk_shards(result: Any) -> list[str] | None:
    """The shard files a chunk commit lists (None if it is not one of ours)."""
    try:
        return [s["file"] for split in result["splits"].values() for s in split["shards"]]
    except (KeyError, TypeError, AttributeError):
        return None


def _manifest(
    opts: Options, tok: Tokenizers, chunks: list[dict[str, Any]], fingerprint: dict[str, Any]
) -> dict[str, Any]:
    splits = {}
    for split in ("train", "heldout"):
        shards = [s for c in chunks for s in c["splits"][split]["shards"]]
        counts = np.sum([c["splits"][split]["modality_tokens"] for c in chunks], axis=0)
        total = int(counts.sum())
        if not shards:
            raise ValueError(
                f"The {split} split is empty: {sum(c['documents'] for c in chunks)} documents "
                f"with --heldout-fraction {opts.heldout_fraction}. Add documents or change the "
                "fraction."
            )
        splits[split] = {
            "shards": [s["file"] for s in shards],
            "shard_records": [s["records"] for s in shards],
            "records": sum(s["records"] for s in shards),
            "tokens": total,
            "modality_tokens": dict(zip(MODALITY_NAMES, map(int, counts), strict=True)),
            "modality_shares": {
                m: float(c) / total for m, c in zip(MODALITY_NAMES, counts, strict=True)
            },
        }
    if tok.external:
        image_tok = {"name": "external", "n_codes": tok.external.n_codes, "decodable": False}
        image = {"grid": list(tok.external.grid), "codes_per_image": tok.codes_per_image}
    else:
        image_tok = {
            "name": ImageTokenizer.name if tok.image else "none",
            "version": ImageTokenizer.version,
            "n_codes": opts.image_codebook,
            "decodable": tok.image is not None,
            **({"file": TOKENIZER_FILE} if tok.image else {}),
        }
        grid = opts.image_size // opts.patch_size
        image = {
            "shape": [opts.image_size, opts.image_size],
            "channels": opts.image_channels,
            "patch_size": opts.patch_size,
            "codes_per_image": grid * grid,
        }
    bad = [b for c in chunks for b in c["bad"]][:LISTED_BAD]
    return {
        "format_version": records.FORMAT_VERSION,
        "name": "user-corpus",
        "seed": opts.seed,
        "heldout_fraction": opts.heldout_fraction,
        "vocab": tok.vocab.to_dict(),
        "text_tokenizer": tok.text.manifest(),
        "image_tokenizer": image_tok,
        "image": image,
        "splits": splits,
        "sources": {"inputs": list(opts.inputs), "files": fingerprint["files"]},
        "documents": sum(c["documents"] for c in chunks),
        "bad_records": {"count": sum(c["bad_count"] for c in chunks), "first": bad},
        "options": dataclasses.asdict(opts),
    }
