"""The options of a corpus preparation (`corpus.py`), and the seeded per-document coins.

Everything here decides the output; the number of worker processes does not.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

from moma_jax.data import text_tokenizers
from moma_jax.data.images import ExternalCodes
from moma_jax.data.inputs import Rules

MAX_CODEBOOK = 1 << 16  # k-means beyond this costs hours; external codes go up to 2**30


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
    allow_outside_paths: bool = False  # image paths may leave the folder of the file naming them
    tokenizer_sample_bytes: int = 64 << 20
    codebook_images: int = 4096

    def check(self) -> None:
        if not self.inputs:
            raise ValueError("--input: give at least one JSONL file, image folder, CSV or text.")
        sizes = {
            "--image-size": self.image_size,
            "--patch-size": self.patch_size,
            "--image-codebook": self.image_codebook,
            "--shard-size": self.shard_bytes,
            "--max-doc-bytes": self.max_doc_bytes,
        }
        for flag, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{flag} {value}: must be a positive number.")
        if self.image_codebook > MAX_CODEBOOK:
            raise ValueError(
                f"--image-codebook {self.image_codebook}: at most {MAX_CODEBOOK} k-means codes."
            )
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed {self.seed}: must be in [0, 2**63).")
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
        image_bytes = self.image_size**2 * self.image_channels * 4  # float32 pixels
        if image_bytes > self.max_record_bytes:
            raise ValueError(
                f"--image-size {self.image_size}: an image takes {image_bytes} bytes, over a "
                f"record's share of --max-memory ({self.max_record_bytes} bytes, 1/16 of it); "
                "lower it or raise --max-memory."
            )
        if self.max_doc_bytes > self.max_record_bytes:
            raise ValueError(
                f"--max-doc-bytes {self.max_doc_bytes} is over a record's share of --max-memory "
                f"({self.max_record_bytes} bytes, 1/16 of it); lower it or raise --max-memory."
            )
        text_tokenizers.parse_choice(self.text_tokenizer)
        if self.image_codes:
            ExternalCodes.parse(self.image_codes)

    @property
    def external(self) -> ExternalCodes | None:
        return ExternalCodes.parse(self.image_codes) if self.image_codes else None

    @property
    def max_record_bytes(self) -> int:
        """The bytes one record (a JSONL or CSV line, a caption) may have: 1/16 of max_memory,
        so a single huge record cannot break the bound (a longer one is a bad record)."""
        return self.max_memory // 16

    @property
    def max_image_pixels(self) -> int:
        """The pixels an image file may have, read from its header before it is decoded: 256x
        the area it is resized to, at least 4096x4096 (any photo), and within max_memory (a
        decoded image costs up to 8 bytes a pixel: RGBA, then a converted copy). More is a
        decompression bomb, a bad record."""
        return min(max(1 << 24, 256 * self.image_size**2), self.max_memory // 8)

    @property
    def rules(self) -> Rules:
        """What `inputs.parse` accepts, from these options."""
        return Rules(
            external_codes=self.image_codes is not None,
            allow_outside_paths=self.allow_outside_paths,
            max_record_bytes=self.max_record_bytes,
        )

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
