"""Turn the bundled sources into mixed-modal documents in ArrayRecord shards plus a manifest.

Documents (ids from ``Vocab``):
    text:             [BOS, utf-8 bytes ..., EOS]                  chunks of paragraphs, <= 1 kB
    image -> caption: [BOS, BOI, 49 codes, EOI, caption bytes, EOS]
    caption -> image: [BOS, caption bytes, BOI, 49 codes, EOI, EOS]
Each image is used once; its direction is a seeded coin flip. Text is capped at
``max_text_chars`` so that images are not drowned out (0: no cap).

``bundle="large"`` (``data.path=bundled-large``, prepared on first use beside the standard
bundle) adds the glyphs of every usable font in matplotlib's wheel, captioned "{font}: {name}",
and the standard library's docstrings, with no text cap: ~12.8M tokens instead of ~2.4M.
About 5% of the documents (seeded, by document) are held out; the image tokenizer is fitted on
training images only.

The dataset is built in a temporary sibling directory and renamed into place, so a killed
prepare never leaves a half dataset and concurrent prepares of one directory are safe. `force`
replaces only a prepared dataset all of whose files a preparation wrote (`outdir.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from moma_jax.data import image_tokenizer, outdir, records, sources, text_tokenizer
from moma_jax.data.image_tokenizer import ImageTokenizer
from moma_jax.data.outdir import MANIFEST, TOKENIZER_FILE
from moma_jax.data.vocab import Vocab
from moma_jax.modality import MODALITY_NAMES

DEFAULT_MAX_TEXT_CHARS = 1_500_000
HELDOUT_FRACTION = 0.05
N_IMAGE_CODES = 512
PATCH_SIZE = 4
MAX_TEXT_DOC_BYTES = 1000
NUM_SHARDS = {"train": 4, "heldout": 2}
SPLITS = tuple(NUM_SHARDS)
BUNDLED_NAME = "bundled-v1"  # bump when the defaults or the record format change
BUNDLED_LARGE_NAME = "bundled-large-v1"
LARGE = "bundled-large"  # the data.path that names the large bundle
_STALE_TMP_SECONDS = 3600  # a prepare takes seconds; older temp dirs are from killed runs
_FIX = "Run `python scripts/prepare_data.py --out {path}` to create it."


def default_data_dir() -> Path:
    """$MOMA_JAX_DATA_DIR, else $XDG_CACHE_HOME (or ~/.cache)/moma_jax/data/bundled-v1."""
    if os.environ.get("MOMA_JAX_DATA_DIR"):
        return Path(os.environ["MOMA_JAX_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "moma_jax" / "data" / BUNDLED_NAME


def heldout_mask(n: int, *, seed: int, stream: str) -> np.ndarray:
    """Seeded bool [n]: which of n documents of one stream ('images', 'text') are held out."""
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: round(n * HELDOUT_FRACTION)]] = True
    return mask


# The manifest keys that fix which tokens a training stream yields and in what order: the
# preparation's options (a user corpus's, but where its inputs lie), the tokenizers, the counts
# of documents, records and tokens per shard, and the digest of the records themselves (an input
# edited without changing any count). Not compared: where and how fast it was prepared (input
# paths and mtimes, timings). Data prepared before the digest existed has none: the digest is
# compared only where both manifests hold one.
CONTENT_KEYS = (
    "format_version",
    "seed",
    "heldout_fraction",
    "vocab",
    "text_tokenizer",
    "image_tokenizer",
    "image",
    "splits",
    "documents",
    "options",
    "records_digest",
)
_WHERE = ("inputs",)  # the options that say where the inputs were, not what they hold


def content_differences(saved: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """The content keys (`CONTENT_KEYS`) in which two manifests differ: [] for the same data."""

    def content(manifest: dict[str, Any], key: str) -> Any:
        value = manifest.get(key)
        if key == "options" and isinstance(value, dict):
            return {k: v for k, v in value.items() if k not in _WHERE}
        return value

    def differ(key: str) -> bool:
        if key == "records_digest" and (key not in saved or key not in here):
            return False  # prepared before the digest existed: the counts above decide
        return content(saved, key) != content(here, key)

    return [k for k in CONTENT_KEYS if differ(k)]


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a prepared dataset (ValueError naming the fix if absent)."""
    path = Path(data_dir).expanduser() / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"No prepared dataset at {path.parent} ({MANIFEST} is missing). "
            + _FIX.format(path=path.parent)
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != records.FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {manifest.get('format_version')}, this code reads "
            f"{records.FORMAT_VERSION}. Re-run `python scripts/prepare_data.py --out "
            f"{path.parent} --force`."
        )
    return manifest


def load_image_tokenizer(data_dir: str | Path) -> ImageTokenizer:
    """The image tokenizer that a prepared dataset was encoded with."""
    manifest = load_manifest(data_dir)
    entry = manifest["image_tokenizer"]
    if "file" not in entry:
        raise ValueError(
            f"{data_dir} has no image decoder: its images are {entry['name']} codes "
            "(an external tokenizer's codes cannot be turned back into pixels here; save them "
            "as .npy and decode them with that tokenizer)."
        )
    return ImageTokenizer.load(Path(data_dir).expanduser() / entry["file"])


def _resolve(data_dir: str | None) -> tuple[Path, str | None]:
    """(directory, bundle) of a data.path: None = the bundled one, "bundled-large" the large
    bundle (beside it); bundle None for a user's prepared directory."""
    if data_dir == LARGE and not Path(LARGE).exists():
        return default_data_dir().parent / BUNDLED_LARGE_NAME, "large"
    if data_dir is not None:
        return Path(data_dir).expanduser(), None
    return default_data_dir(), "standard"


def prepared_manifest(data_dir: str | None) -> dict[str, Any] | None:
    """The manifest of the dataset `ensure_data(data_dir)` would return, or None where it is
    not prepared yet (nothing is prepared: for read-only callers such as `compare.py --status`)."""
    path, _ = _resolve(data_dir)
    return load_manifest(path) if (path / MANIFEST).is_file() else None


def ensure_data(data_dir: str | None) -> Path:
    """Directory of a prepared dataset; None = the bundled one, "bundled-large" the large
    bundle (beside it), each prepared on first use."""
    path, bundle = _resolve(data_dir)
    if bundle is None:
        if not (path / MANIFEST).is_file():
            raise ValueError(
                f"Data directory {path} does not exist or holds no {MANIFEST}. "
                + _FIX.format(path=path)
            )
        return path
    return _ensure_bundle(path, bundle)


def _ensure_bundle(path: Path, bundle: str) -> Path:
    if not (path / MANIFEST).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # The lock only saves duplicate work (e.g. pytest-xdist workers); safety comes from
        # prepare's atomic rename.
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / MANIFEST).is_file():
                prepare(path, bundle=bundle)
    return path


def prepare(
    out_dir: str | Path,
    *,
    seed: int = 0,
    max_text_chars: int | None = None,
    force: bool = False,
    bundle: str = "standard",
) -> dict[str, Any]:
    """Build the bundled dataset ("standard" or "large") into ``out_dir``; return its manifest.
    ``max_text_chars``: default 1.5M for the standard bundle, 0 (uncapped) for the large one.

    An existing dataset there built with the same settings is returned as is unless ``force``.
    """
    if bundle not in ("standard", "large"):
        raise ValueError(f"bundle={bundle!r}: expected 'standard' or 'large'")
    if max_text_chars is None:
        max_text_chars = 0 if bundle == "large" else DEFAULT_MAX_TEXT_CHARS
    out = Path(out_dir).expanduser().absolute()
    if out.is_symlink() and out.is_dir():
        out = out.resolve()  # the dataset is renamed into place: into the linked directory
    outdir.check_target(out, [])
    ours = (out / MANIFEST).is_file() and MANIFEST not in outdir.foreign_files(out)
    if ours and not force:
        manifest = load_manifest(out)
        built = manifest.get("bundle", "standard")
        settings = (manifest.get("seed"), manifest.get("max_text_chars"), built)
        if settings != (seed, max_text_chars, bundle):
            raise ValueError(
                f"{out} already holds a dataset built with seed={settings[0]}, "
                f"max_text_chars={settings[1]}, bundle={settings[2]}. Pass --force to rebuild "
                "it with the new settings, or choose another --out."
            )
        return manifest
    outdir.refuse_foreign(out)  # before the work; _commit checks again
    if out.exists() and not ours and any(out.iterdir()) and not force:
        raise ValueError(
            f"{out} holds an unfinished preparation and no {MANIFEST}; refusing to overwrite "
            "it. Pass --force to replace it, or choose a new or empty --out directory."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is an ordinary readable dir
    try:
        _build(tmp, seed=seed, max_text_chars=max_text_chars, bundle=bundle)
        _commit(tmp, out, force=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_manifest(out)


def _commit(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename the finished ``tmp`` to ``out``; a dataset committed meanwhile wins unless forced.
    Forced, the old ``out`` is renamed away and only the files a preparation wrote are removed
    from it (a directory holding any other file is refused before)."""
    old = None
    if force and out.exists():
        outdir.refuse_foreign(out)
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        with contextlib.suppress(FileNotFoundError):  # a concurrent prepare moved it already
            os.rename(out, old)
    try:
        os.rename(tmp, out)  # atomic; replaces an empty directory, fails on a full one
    except OSError:
        if not (out / MANIFEST).is_file():
            raise
    finally:
        if old is not None and old.exists():
            outdir.remove_ours(old, keep_lock=False)
            with contextlib.suppress(OSError):  # a file that appeared meanwhile stays
                old.rmdir()


def _image_doc(codes_P: np.ndarray, caption: str, image_first: bool, vocab: Vocab) -> np.ndarray:
    image = np.concatenate([[vocab.boi], codes_P + vocab.image_offset, [vocab.eoi]])
    text = text_tokenizer.encode(caption)
    body = [image, text] if image_first else [text, image]
    return np.concatenate([[vocab.bos], *body, [vocab.eos]]).astype(np.int32)


def _text_doc(text: str, vocab: Vocab) -> np.ndarray:
    return np.concatenate([[vocab.bos], text_tokenizer.encode(text), [vocab.eos]]).astype(np.int32)


def _select_text(seed: int, max_text_chars: int, bundle: str) -> tuple[list[str], list[str]]:
    """Paragraph chunks of all text sources, a seeded subset of at most max_text_chars chars
    (0: all of them)."""
    named = [("shakespeare", t) for _, t in sources.load_shakespeare()]
    named += [("pydoc", t) for _, t in sources.load_pydoc_topics()]
    if bundle == "large":
        named += [("docstrings", t) for _, t in sources.load_stdlib_docstrings()]
    chunks = [(src, c) for src, t in named for c in sources.split_paragraphs(t, MAX_TEXT_DOC_BYTES)]
    order = np.random.default_rng([seed, zlib.crc32(b"text-cap")]).permutation(len(chunks))
    lengths = np.array([len(chunks[i][1]) for i in order])
    fits = np.cumsum(lengths) <= max_text_chars if max_text_chars else np.ones(len(order), bool)
    keep = np.sort(order[fits])  # keep the reading order
    return [chunks[i][1] for i in keep], [chunks[i][0] for i in keep]


def _build(out: Path, *, seed: int, max_text_chars: int, bundle: str) -> dict[str, Any]:
    """Write shards, tokenizer and manifest for the bundled sources into ``out``."""
    start = time.perf_counter()
    vocab = Vocab(n_text=text_tokenizer.N_TEXT, n_image_codes=N_IMAGE_CODES)
    mnist, mnist_captions = sources.load_mnist()
    large = bundle == "large"
    glyphs, glyph_captions = sources.load_font_glyphs() if large else sources.load_glyphs()
    images_NxHxW = np.concatenate([mnist, glyphs])
    captions = mnist_captions + glyph_captions
    image_kinds = ["mnist"] * len(mnist) + ["fonts" if large else "dejavu"] * len(glyphs)
    image_heldout = heldout_mask(len(images_NxHxW), seed=seed, stream="images")

    train_patches = image_tokenizer.image_to_patches(images_NxHxW[~image_heldout], PATCH_SIZE)
    tokenizer = ImageTokenizer.fit(
        train_patches.reshape(-1, PATCH_SIZE**2),
        n_codes=N_IMAGE_CODES,
        patch_size=PATCH_SIZE,
        image_size=sources.IMAGE_SIZE,
        seed=seed,
    )
    tokenizer.save(out / TOKENIZER_FILE)
    codes_NxP = tokenizer.encode(images_NxHxW)

    image_first = np.random.default_rng([seed, zlib.crc32(b"direction")]).random(len(codes_NxP))
    texts, text_kinds = _select_text(seed, max_text_chars, bundle)
    docs = [
        _image_doc(c, cap, f < 0.5, vocab)
        for c, cap, f in zip(codes_NxP, captions, image_first, strict=True)
    ]
    docs += [_text_doc(t, vocab) for t in texts]
    kinds = image_kinds + text_kinds
    heldout = np.concatenate([image_heldout, heldout_mask(len(texts), seed=seed, stream="text")])

    splits = {}
    for split, ids in (("train", np.flatnonzero(~heldout)), ("heldout", np.flatnonzero(heldout))):
        # Shuffled once here so that shards and the unshuffled eval stream mix all kinds.
        ids = np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(ids)
        splits[split] = _write_split(out, split, ids, docs, kinds, vocab)
    manifest = {
        "format_version": records.FORMAT_VERSION,
        "name": BUNDLED_LARGE_NAME if large else BUNDLED_NAME,
        "bundle": bundle,
        "seed": seed,
        "max_text_chars": max_text_chars,
        "heldout_fraction": HELDOUT_FRACTION,
        "vocab": vocab.to_dict(),
        "text_tokenizer": {"name": text_tokenizer.NAME, "version": text_tokenizer.VERSION},
        "image_tokenizer": {
            "name": tokenizer.name,
            "version": tokenizer.version,
            "file": TOKENIZER_FILE,
            "n_codes": tokenizer.n_codes,
        },
        "image": {
            "shape": [sources.IMAGE_SIZE, sources.IMAGE_SIZE],
            "channels": 1,
            "patch_size": PATCH_SIZE,
            "codes_per_image": tokenizer.codes_per_image,
        },
        "splits": splits,
        "sources": {
            name: {"documents": kinds.count(name), "license": lic}
            for name, lic in {**sources.LICENSES, **sources.LARGE_LICENSES}.items()
            if kinds.count(name)
        },
        "records_digest": records.records_digest(out, splits),
        "prepare_seconds": round(time.perf_counter() - start, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_split(
    out: Path, split: str, ids: np.ndarray, docs: list[np.ndarray], kinds: list[str], vocab: Vocab
) -> dict[str, Any]:
    """Write one split's documents into ArrayRecord shards; return its counts and shares."""
    n_shards = NUM_SHARDS[split]
    shard_names = [f"{split}-{i:05d}-of-{n_shards:05d}.array_record" for i in range(n_shards)]
    per_modality = np.zeros(len(MODALITY_NAMES), dtype=np.int64)
    by_kind: dict[str, int] = {}
    shards = np.array_split(ids, n_shards)
    for name, shard_ids in zip(shard_names, shards, strict=True):
        # group_size:1 makes every record its own chunk, so random access reads one record.
        with outdir.disk_errors(out / name):  # a full disk: an OSError, not a RuntimeError
            writer = ArrayRecordWriter(str(out / name), "group_size:1")
            for doc_id in shard_ids:
                tokens = docs[doc_id]
                modality = vocab.modality_of(tokens)
                records.validate(tokens, modality, vocab, f"document {doc_id} ({kinds[doc_id]})")
                writer.write(records.serialize(int(doc_id), tokens, modality))
                per_modality += np.bincount(modality, minlength=len(MODALITY_NAMES))
                by_kind[kinds[doc_id]] = by_kind.get(kinds[doc_id], 0) + 1
            writer.close()
    total = int(per_modality.sum())
    return {
        "shards": shard_names,
        "shard_records": [len(x) for x in shards],
        "records": len(ids),
        "tokens": total,
        "modality_tokens": {m: int(c) for m, c in zip(MODALITY_NAMES, per_modality, strict=True)},
        "modality_shares": {
            m: float(c) / total for m, c in zip(MODALITY_NAMES, per_modality, strict=True)
        },
        "documents_by_source": dict(sorted(by_kind.items())),
    }
