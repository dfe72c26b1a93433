"""Modality ids and the layout of the one shared vocabulary.

Layout (ids in increasing order):

    [0, n_text)                          text ids (UTF-8 bytes for the byte tokenizer)
    [n_text, n_text + n_image_codes)     image codes, offset by ``image_offset``
    BOS, EOS, BOI, EOI, PAD              special tokens, one id each

Modality of the special tokens: a boundary token takes the modality of what it opens or closes.
BOS/EOS open and close a document, whose frame is text, so they are TEXT; BOI/EOI open and close
an image, so they are IMAGE. The model therefore routes EOI (which predicts the text after the
image) through the image experts, and BOI (which predicts the first image code) too. PAD is TEXT
only so that its modality is a valid id; it has segment id 0 and is never in the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moma_jax.modality import IMAGE, MODALITY_NAMES, TEXT

__all__ = ["IMAGE", "MODALITY_NAMES", "TEXT", "Vocab"]

_SPECIALS = ("bos", "eos", "boi", "eoi", "pad")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """One vocabulary: text ids, then image codes at an offset, then special tokens."""

    n_text: int = 256
    n_image_codes: int = 512

    def __post_init__(self) -> None:
        if self.n_text <= 0 or self.n_image_codes <= 0:
            raise ValueError(
                f"Vocab needs n_text > 0 and n_image_codes > 0, got n_text={self.n_text}, "
                f"n_image_codes={self.n_image_codes}."
            )

    @property
    def image_offset(self) -> int:
        """Id of image code 0."""
        return self.n_text

    @property
    def bos(self) -> int:
        """Begin-of-document token (modality TEXT)."""
        return self.n_text + self.n_image_codes

    @property
    def eos(self) -> int:
        """End-of-document token (modality TEXT)."""
        return self.bos + 1

    @property
    def boi(self) -> int:
        """Begin-of-image token (modality IMAGE)."""
        return self.bos + 2

    @property
    def eoi(self) -> int:
        """End-of-image token (modality IMAGE)."""
        return self.bos + 3

    @property
    def pad(self) -> int:
        """Padding token (modality TEXT, segment id 0, never in the loss)."""
        return self.bos + 4

    @property
    def size(self) -> int:
        """Number of ids, i.e. the embedding table height."""
        return self.bos + len(_SPECIALS)

    def modality_of(self, tokens: np.ndarray) -> np.ndarray:
        """Modality id (int8) that each token id implies under the boundary-token rule."""
        tokens = np.asarray(tokens)
        is_image = (tokens >= self.image_offset) & (tokens < self.bos)
        is_image |= (tokens == self.boi) | (tokens == self.eoi)
        return np.where(is_image, IMAGE, TEXT).astype(np.int8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description of the layout (stored in the dataset manifest)."""
        return {
            "n_text": self.n_text,
            "n_image_codes": self.n_image_codes,
            "text_ids": [0, self.n_text],
            "image_ids": [self.image_offset, self.image_offset + self.n_image_codes],
            **{name: getattr(self, name) for name in _SPECIALS},
            "size": self.size,
            "modalities": {name: i for i, name in enumerate(MODALITY_NAMES)},
            "special_modalities": {
                "bos": "text",
                "eos": "text",
                "boi": "image",
                "eoi": "image",
                "pad": "text",
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        """Inverse of ``to_dict``; checks that the stored ids match this code's layout."""
        vocab = cls(n_text=int(d["n_text"]), n_image_codes=int(d["n_image_codes"]))
        expected = vocab.to_dict()
        wrong = {k: (d[k], expected[k]) for k in expected if k in d and d[k] != expected[k]}
        if wrong:
            raise ValueError(
                f"Vocabulary layout {wrong} (stored, expected) does not match this version of "
                "moma_jax. Re-run `python scripts/prepare_data.py --out DIR --force`."
            )
        return vocab
