"""The text tokenizer a dataset is prepared with: bytes, a byte-level BPE trained here, or a
user's `tokenizer.json` / SentencePiece `.model`. Each maps str <-> ids in [0, n_text).

`--text-tokenizer` spells the choice: `bytes` (UTF-8 bytes, 256 ids, nothing to train),
`bpe:SIZE` (a byte-level BPE of SIZE text ids trained with Hugging Face `tokenizers` on a
bounded, seeded sample of the training documents; exact round trip), or a path to an existing
`tokenizer.json` (the format Chameleon ships) or SentencePiece `.model` (read only; needs the
`sentencepiece` package). A trained or given tokenizer is copied into the dataset directory (as
`tokenizer.json` or `tokenizer.model`) and named in the manifest, so a dataset is self-contained.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from moma_jax.data import outdir
from moma_jax.data import text_tokenizer as byte_tokenizer

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"


class TextTokenizer(Protocol):
    name: str
    n_text: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray) -> str: ...

    def manifest(self) -> dict[str, Any]: ...


class Bytes:
    """UTF-8 bytes (`text_tokenizer.py`)."""

    name = byte_tokenizer.NAME
    n_text = byte_tokenizer.N_TEXT

    def encode(self, text: str) -> np.ndarray:
        return byte_tokenizer.encode(text)

    def decode(self, ids: np.ndarray) -> str:
        return byte_tokenizer.decode(ids)

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "version": byte_tokenizer.VERSION, "n_text": self.n_text}


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer from its `tokenizer.json`. `n_text` is at least its
    vocabulary size (a trained BPE keeps the SIZE asked for, so the layout is what was asked)."""

    def __init__(self, path: Path, n_text: int | None = None, kind: str = "tokenizer.json"):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.tokenizer = Tokenizer.from_file(str(path))
        size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.n_text = max(size, n_text or 0)
        self.name = kind

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: np.ndarray) -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_text):
            raise ValueError(f"Text ids must lie in [0, {self.n_text}); select text tokens first.")
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def manifest(self) -> dict[str, Any]:
        import tokenizers

        return {
            "name": self.name,
            "version": f"tokenizers-{tokenizers.__version__}",
            "file": TOKENIZER_JSON,
            "n_text": self.n_text,
        }


class SentencePiece:
    """A SentencePiece `.model`, read only (needs the `sentencepiece` package)."""

    name = "sentencepiece"

    def __init__(self, path: Path):
        try:
            import sentencepiece  # type: ignore[import-not-found]
        except ImportError:
            raise ValueError(
                f"{path} is a SentencePiece model, which needs `pip install sentencepiece` "
                "(not a moma_jax dependency); or convert it to a tokenizer.json and pass that."
            ) from None
        self.path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # sentencepiece raises OSError or RuntimeError
            raise ValueError(
                f"{path} is not a SentencePiece model ({str(e)[:200]}); give a .model file, "
                "a tokenizer.json, `bytes` or `bpe:SIZE`."
            ) from None
        self.n_text = int(self.sp.get_piece_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return str(self.sp.decode([int(i) for i in ids]))

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "version": "1", "file": self.path.name, "n_text": self.n_text}


def train_bpe(texts: Iterable[str], size: int, out_file: Path) -> HFTokenizer:
    """A byte-level BPE with `size` text ids (256 byte symbols, then merges), trained on `texts`,
    written to `out_file`. No special tokens: moma_jax's own specials follow the image codes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if size < 257:
        raise ValueError(f"--text-tokenizer bpe:{size}: SIZE must exceed the 256 byte symbols.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    with outdir.replacing(out_file) as tmp:
        tokenizer.save(str(tmp))
    return HFTokenizer(out_file, n_text=size, kind=f"bpe:{size}")


def parse_choice(choice: str) -> tuple[str, Any]:
    """`bytes` | `bpe:SIZE` | a path -> (kind, argument); ValueError naming the fix."""
    if choice == "bytes":
        return "bytes", None
    if choice.startswith("bpe:"):
        try:
            size = int(choice[4:])
        except ValueError:
            raise ValueError(f"--text-tokenizer {choice}: SIZE must be an integer.") from None
        if not 257 <= size <= 1 << 24:
            raise ValueError(
                f"--text-tokenizer {choice}: SIZE must exceed the 256 byte symbols (and be at "
                "most 2**24)."
            )
        return "bpe", size
    path = Path(choice).expanduser()
    if not path.is_file():
        raise ValueError(
            f"--text-tokenizer {choice}: not `bytes`, `bpe:SIZE`, or an existing tokenizer.json "
            "or SentencePiece .model file."
        )
    return "file", path


def check_file(path: Path) -> None:
    """ValueError unless `path` reads as a tokenizer (before anything is written)."""
    if path.suffix == ".model":
        SentencePiece(path)
        return
    try:
        HFTokenizer(path)
    except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
        raise ValueError(
            f"--text-tokenizer {path} is not a tokenizer.json that Hugging Face `tokenizers` "
            f"can read ({str(e)[:200]}); give a tokenizer.json, a SentencePiece .model, "
            "`bytes` or `bpe:SIZE`."
        ) from None


def from_file(path: Path, out_dir: Path) -> TextTokenizer:
    """A user's tokenizer file, copied into the dataset directory."""
    name = SENTENCEPIECE_MODEL if path.suffix == ".model" else TOKENIZER_JSON
    with outdir.replacing(out_dir / name) as tmp:
        tmp.write_bytes(path.read_bytes())
    if path.suffix == ".model":
        return SentencePiece(out_dir / name)
    return HFTokenizer(out_dir / name)


def load(entry: dict[str, Any], data_dir: Path) -> TextTokenizer:
    """The text tokenizer a manifest names (its `text_tokenizer` entry)."""
    if entry["name"] == byte_tokenizer.NAME:
        return Bytes()
    if entry["name"] == SentencePiece.name:
        return SentencePiece(data_dir / entry["file"])
    return HFTokenizer(data_dir / entry["file"], n_text=entry["n_text"], kind=entry["name"])
