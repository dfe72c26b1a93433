"""Image files -> arrays for the image tokenizer, and the spec of external image codes.

Every image of a dataset is brought to one square size (`--image-size`, recorded in the
manifest): centre-cropped to a square, resized (bicubic), in [0, 1], grey [S, S] or colour
[S, S, 3] (`--image-channels`). An unreadable file is a `BadRecordError` naming it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moma_jax.data.inputs import BadRecordError


def load_image(path: Path, size: int, channels: int, source: str, line: int) -> np.ndarray:
    """The image at `path` as float32 in [0, 1], [S, S] (grey) or [S, S, 3] (colour)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as f:
            im = f.convert("L" if channels == 1 else "RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise BadRecordError(source, line, f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadRecordError(source, line, f"image {path} is unreadable ({e})") from None
    return array


@dataclasses.dataclass(frozen=True)
class ExternalCodes:
    """Codes from an image tokenizer outside moma_jax (e.g. Chameleon's VQ-GAN: 8192 codes on
    a 32x32 grid): `--image-codes CODEBOOK:HxW`. The framework cannot decode them."""

    n_codes: int
    grid: tuple[int, int]

    @property
    def codes_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def parse(cls, spec: str) -> ExternalCodes:
        try:
            codebook, grid = spec.split(":")
            h, w = grid.lower().split("x")
            out = cls(int(codebook), (int(h), int(w)))
        except ValueError:
            raise ValueError(
                f"--image-codes {spec!r}: expected CODEBOOK:HxW, e.g. 8192:32x32 (Chameleon)."
            ) from None
        if out.n_codes <= 0 or min(out.grid) <= 0:
            raise ValueError(f"--image-codes {spec!r}: sizes must be positive.")
        return out

    def check(self, codes: np.ndarray, source: str, line: int) -> np.ndarray:
        """The codes of one image as int32, or BadRecordError naming what is wrong."""
        if codes.ndim != 1 or len(codes) != self.codes_per_image:
            raise BadRecordError(
                source,
                line,
                f"image_codes has {codes.size} codes; --image-codes {self.n_codes}:"
                f"{self.grid[0]}x{self.grid[1]} means {self.codes_per_image} per image",
            )
        bad = np.flatnonzero((codes < 0) | (codes >= self.n_codes))
        if len(bad):
            raise BadRecordError(
                source,
                line,
                f"image code {int(codes[bad[0]])} at position {int(bad[0])} is outside the "
                f"codebook [0, {self.n_codes})",
            )
        return codes.astype(np.int32)
