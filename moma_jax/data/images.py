"""Image files -> arrays for the image tokenizer, and the spec of external image codes.

Every image of a dataset is brought to one square size (`--image-size`, recorded in the
manifest): centre-cropped to a square, resized (bicubic), in [0, 1], grey [S, S] or colour
[S, S, 3] (`--image-channels`). An unreadable file is a `BadRecordError` naming it; so is a file
that is not a regular one (never opened: a FIFO would block) and an image whose header declares
more than `max_pixels` (checked before decoding: a decompression bomb, a few kB that decode to
gigabytes, costs nothing).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

from moma_jax.data.inputs import BadRecordError, regular_file

MAX_PIXELS = 1 << 24  # 4096x4096; a preparation sets its own (`Options.max_image_pixels`)


def load_image(
    path: Path, size: int, channels: int, source: str, line: int, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """The image at `path` as float32 in [0, 1], [S, S] (grey) or [S, S, 3] (colour)."""
    from PIL import Image

    regular_file(path, source, line, "image")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as file, warnings.catch_warnings():
            # PIL warns past its own limit (~89M pixels) and raises past twice that; a warning
            # is a bomb here too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as f:  # reads the header only
                w, h = f.size
                if w * h > max_pixels:
                    raise BadRecordError(
                        source,
                        line,
                        f"image {path} is {w}x{h} = {w * h:,} pixels, over the {max_pixels:,} "
                        "allowed (a decompression bomb?); shrink it, or raise --max-memory",
                    )
                im = f.convert("L" if channels == 1 else "RGB")
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        im = im.resize((size, size), Image.Resampling.BICUBIC)
        array = np.asarray(im, dtype=np.float32) / 255.0
    except BadRecordError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRecordError(source, line, f"image {path} is a decompression bomb ({e})") from None
    except MemoryError:
        raise BadRecordError(source, line, f"image {path} does not fit in memory") from None
    except Exception as e:  # decoders of hostile files raise OSError, SyntaxError, struct.error...
        raise BadRecordError(
            source, line, f"image {path} is unreadable ({type(e).__name__}: {e})"
        ) from None
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
        if out.n_codes > 1 << 30 or out.codes_per_image > 1 << 20:
            raise ValueError(
                f"--image-codes {spec!r}: at most 2**30 codes and 2**20 codes per image."
            )
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
