"""Byte-level UTF-8 text tokenizer: one token per byte, ids 0..255.

Why bytes rather than BPE: there is nothing to train, any string round-trips exactly (no unknown
token, no normalisation), and a 256-entry text vocabulary suits the tiny models that run on a
laptop CPU. The cost is ~4x longer text sequences than BPE. A BPE tokenizer is a drop-in
replacement later: it only has to map str <-> ids in [0, n_text) and set ``Vocab.n_text``.
"""

from __future__ import annotations

import numpy as np

NAME = "byte-utf8"
VERSION = "1"
N_TEXT = 256


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 ids."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids: np.ndarray) -> str:
    """Inverse of ``encode``; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= N_TEXT):
        raise ValueError(
            f"Byte ids must lie in [0, {N_TEXT}), got values in [{ids.min()}, {ids.max()}]. "
            "Select the text tokens (modality text, id < 256) before decoding."
        )
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
