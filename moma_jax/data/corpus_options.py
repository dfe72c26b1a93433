"""The options of a corpus preparation (`corpus.py`), and the seeded per-document coins.

Everything here decides the output; the number of worker processes does not.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

from moma_jax.data import text_tokenizers
from moma_jax.data.images import ExternalCodes


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything that decides the output (the worker count does not)."""

    inputs: tuple[str, ...]
    text_tokenizer: str = "bytes"
    image_codes: str | None = None  # "CODEBOOK:HxW": external codes instead of k-means
    image_codebook: int = 512
    image_size: int = 32
    image_channels: int = 3
    patch_size: int = 4
    heldout_fraction: float = 0.05
    seed: int = 0
    shard_bytes: int = 64 << 20
    max_doc_bytes: int = 4096
    max_memory: int = 512 << 20
    skip_bad: bool = False
    tokenizer_sample_bytes: int = 64 << 20
    codebook_images: int = 4096

    def check(self) -> None:
        if not self.inputs:
            raise ValueError("--input: give at least one JSONL file, image folder, CSV or text.")
        if self.image_channels not in (1, 3):
            raise ValueError(f"--image-channels {self.image_channels}: 1 (grey) or 3 (colour).")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"--image-size {self.image_size} is not a multiple of --patch-size "
                f"{self.patch_size}; use a multiple of it."
            )
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"--heldout-fraction {self.heldout_fraction} must be in (0, 1).")
        if self.max_memory < 10**6:
            raise ValueError(f"--max-memory {self.max_memory} bytes: at least 1MB.")
        text_tokenizers.parse_choice(self.text_tokenizer)
        if self.image_codes:
            ExternalCodes.parse(self.image_codes)

    @property
    def external(self) -> ExternalCodes | None:
        return ExternalCodes.parse(self.image_codes) if self.image_codes else None

    @property
    def chunk_bytes(self) -> int:
        """Input bytes per chunk, from the options only (never the worker count, so the
        chunks and shards are the same for any number of workers): 1/32 of max_memory."""
        return max(16 << 10, min(self.shard_bytes, self.max_memory // 32))

    def in_flight(self, workers: int) -> int:
        """Chunks submitted at once: two per worker, within max_memory (a chunk in flight costs
        about 4x its input bytes: the records, then their tokens and serialised bytes)."""
        return max(1, min(2 * workers, self.max_memory // (4 * self.chunk_bytes)))


def held_out(seed: int, index: int, fraction: float) -> bool:
    """A seeded coin per document index (the same in every process and run)."""
    return zlib.crc32(struct.pack("<qq", seed, index)) < fraction * 2**32


def image_first(seed: int, index: int) -> bool:
    """For image+caption records: the image before its caption, or after (a seeded coin)."""
    return zlib.crc32(struct.pack("<qqq", seed, index, 1)) % 2 == 0
