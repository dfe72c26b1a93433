"""Image tokenizer the framework trains itself: a k-means codebook over non-overlapping patches.

A 28x28 grey image in [0, 1] is cut into 4x4 patches (7x7 = 49 per image); each patch becomes
the id of its nearest codebook vector (512 by default). Decoding looks the vectors up and puts
the patches back.

Why k-means rather than a VQ-VAE (what Chameleon uses): it trains in a few seconds on 2 CPU
cores, it is deterministic given a seed, encoding is the exact nearest code (no encoder network
to drift) and decoding is a table lookup, so generated image tokens can always be viewed as
pictures. At 28x28 grey the patches are small enough that a flat codebook reconstructs them well
(see tests/test_tokenizers.py). A learned VQ-VAE is the upgrade path for larger images: it only
has to provide ``encode``, ``decode``, ``n_codes`` and ``codes_per_image``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

NAME = "kmeans-patch"
VERSION = "1"

_CHUNK = 16384  # rows per distance block: 16384 x 512 float32 = 32 MiB


def image_to_patches(images: np.ndarray, patch_size: int) -> np.ndarray:
    """Non-overlapping patches, row-major over the patch grid: [N, (H/p)*(W/p), p*p*C] from
    grey [N, H, W] (C = 1) or colour [N, H, W, C] images."""
    x = images if images.ndim == 4 else images[..., None]
    n, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"Image size {h}x{w} is not a multiple of the patch size {p}.")
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x.reshape(n, (h // p) * (w // p), p * p * c), dtype=np.float32)


def patches_to_image(
    patches_NxPxD: np.ndarray, image_size: int, patch_size: int, channels: int = 1
) -> np.ndarray:
    """Inverse of ``image_to_patches`` for square images ([N, S, S], or [N, S, S, C] if C > 1)."""
    n = patches_NxPxD.shape[0]
    g, p, c = image_size // patch_size, patch_size, channels
    x = patches_NxPxD.reshape(n, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, image_size, image_size, c)
    return x[..., 0] if c == 1 else x


def nearest_code(x_PxD: np.ndarray, codebook_QxD: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook row (squared Euclidean) for every row of x, in blocks."""
    # argmin_k |x - c_k|^2 = argmin_k (|c_k|^2 - 2 x.c_k): one matmul per block, no [M, K, D].
    c_sq_Q = np.einsum("kd,kd->k", codebook_QxD, codebook_QxD)
    # Blank background patches are ~2/3 of MNIST and glyph patches; they share one answer.
    out_P = np.full(len(x_PxD), np.argmin(c_sq_Q), dtype=np.int32)
    inked = np.flatnonzero(x_PxD.any(axis=1))
    minus_2c_DxQ = -2.0 * codebook_QxD.T
    for start in range(0, len(inked), _CHUNK):
        rows = inked[start : start + _CHUNK]
        scores = x_PxD[rows] @ minus_2c_DxQ
        scores += c_sq_Q
        out_P[rows] = np.argmin(scores, axis=1)
    return out_P


def _kmeans_plus_plus(x_PxD: np.ndarray, n_codes: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre is drawn with probability proportional to D(x)^2."""
    centres = np.empty((n_codes, x_PxD.shape[1]), dtype=np.float32)
    centres[0] = x_PxD[rng.integers(len(x_PxD))]
    d2_P = np.sum((x_PxD - centres[0]) ** 2, axis=1)
    for k in range(1, n_codes):
        total = d2_P.sum()
        # Fewer distinct points than codes: the rest are duplicates, drawn uniformly.
        probs = d2_P / total if total > 0 else None
        centres[k] = x_PxD[rng.choice(len(x_PxD), p=probs)]
        d2_P = np.minimum(d2_P, np.sum((x_PxD - centres[k]) ** 2, axis=1))
    return centres


class ImageTokenizer:
    """Patch k-means tokenizer: ``encode`` images -> int32 codes, ``decode`` codes -> images."""

    name = NAME
    version = VERSION

    def __init__(
        self,
        codebook_QxD: np.ndarray,
        *,
        image_size: int = 28,
        patch_size: int = 4,
        channels: int = 1,
    ):
        if codebook_QxD.shape[1] != patch_size * patch_size * channels:
            raise ValueError(
                f"Codebook rows have {codebook_QxD.shape[1]} values but patches of "
                f"{patch_size}x{patch_size}x{channels} have {patch_size * patch_size * channels}."
            )
        if image_size % patch_size:
            raise ValueError(
                f"Image size {image_size} is not a multiple of the patch size {patch_size}."
            )
        self.codebook_QxD = np.asarray(codebook_QxD, dtype=np.float32)
        self.image_size = image_size
        self.patch_size = patch_size
        self.channels = channels

    @property
    def n_codes(self) -> int:
        """Codebook size K."""
        return len(self.codebook_QxD)

    @property
    def codes_per_image(self) -> int:
        """Number of codes P per image (patches per image)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def fit(
        cls,
        patches_PxD: np.ndarray,
        *,
        n_codes: int = 512,
        image_size: int = 28,
        patch_size: int = 4,
        channels: int = 1,
        seed: int = 0,
        iters: int = 10,
        sample_size: int = 200_000,
        init_size: int = 16_384,
    ) -> ImageTokenizer:
        """Fit the codebook with k-means.

        Steps:
          1. Draw (seeded) at most ``sample_size`` training patches; Lloyd runs on these.
          2. Seed ``n_codes`` centres with k-means++ on at most ``init_size`` of them.
          3. ``iters`` Lloyd iterations: assign every sampled patch to its nearest centre, move
             each centre to the mean of its patches. A centre left empty is re-seeded at the
             patch that is worst served, so no code is wasted. Stops early when nothing moves.
        """
        rng = np.random.default_rng(seed)
        x_PxD = np.asarray(patches_PxD, dtype=np.float32)
        if len(x_PxD) < n_codes:
            raise ValueError(f"Need at least n_codes={n_codes} patches to fit, got {len(x_PxD)}.")
        if len(x_PxD) > sample_size:
            x_PxD = x_PxD[rng.choice(len(x_PxD), sample_size, replace=False)]
        init_idx = rng.choice(len(x_PxD), min(init_size, len(x_PxD)), replace=False)
        centres_QxD = _kmeans_plus_plus(x_PxD[init_idx], n_codes, rng)
        inked = np.flatnonzero(x_PxD.any(axis=1))
        inked_x = x_PxD[inked].astype(np.float64)
        assign_P = None
        for _ in range(iters):
            new_assign_P = nearest_code(x_PxD, centres_QxD)
            if assign_P is not None and np.array_equal(new_assign_P, assign_P):
                break
            assign_P = new_assign_P
            counts_Q = np.bincount(assign_P, minlength=n_codes)
            # Blank patches add nothing to the sums; skipping them saves ~2/3 of the work.
            sums_QxD = np.stack(
                [
                    np.bincount(assign_P[inked], weights=inked_x[:, d], minlength=n_codes)
                    for d in range(x_PxD.shape[1])
                ],
                axis=1,
            )
            filled = counts_Q > 0
            centres_QxD[filled] = (sums_QxD[filled] / counts_Q[filled, None]).astype(np.float32)
            empty = np.flatnonzero(~filled)
            if len(empty):
                err_P = np.sum((x_PxD - centres_QxD[assign_P]) ** 2, axis=1)
                centres_QxD[empty] = x_PxD[np.argsort(-err_P, kind="stable")[: len(empty)]]
        return cls(centres_QxD, image_size=image_size, patch_size=patch_size, channels=channels)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Images in [0, 1] ([N, S, S] grey, [N, S, S, C] colour) -> codes int32 [N, P]."""
        images = np.asarray(images, dtype=np.float32)
        s, c = self.image_size, self.channels
        expected = (s, s) if c == 1 else (s, s, c)
        if images.shape[1:] != expected:
            raise ValueError(
                f"Expected images [N, {', '.join(map(str, expected))}], got shape {images.shape}."
            )
        patches_NxPxD = image_to_patches(images, self.patch_size)
        n, p, d = patches_NxPxD.shape
        return nearest_code(patches_NxPxD.reshape(n * p, d), self.codebook_QxD).reshape(n, p)

    def decode(self, codes_NxP: np.ndarray) -> np.ndarray:
        """Codes [N, P] -> images float32 [N, H, W] (lookup, then patches back in place)."""
        codes_NxP = np.asarray(codes_NxP)
        if codes_NxP.size and (codes_NxP.min() < 0 or codes_NxP.max() >= self.n_codes):
            raise ValueError(
                f"Codes must lie in [0, {self.n_codes}), got [{codes_NxP.min()}, "
                f"{codes_NxP.max()}]. Subtract Vocab.image_offset from token ids first."
            )
        patches_NxPxD = self.codebook_QxD[codes_NxP]
        return patches_to_image(patches_NxPxD, self.image_size, self.patch_size, self.channels)

    def save(self, path: str | Path) -> None:
        """Write the codebook and geometry to an .npz file."""
        with open(path, "wb") as f:
            np.savez(
                f,
                codebook_KxD=self.codebook_QxD,  # the file's key predates the Q spelling; kept
                image_size=self.image_size,
                patch_size=self.patch_size,
                channels=self.channels,
                name=self.name,
                version=self.version,
            )

    @classmethod
    def load(cls, path: str | Path) -> ImageTokenizer:
        """Read a tokenizer written by ``save``."""
        with np.load(path) as z:
            if str(z["name"]) != NAME or str(z["version"]) != VERSION:
                raise ValueError(
                    f"{path} holds image tokenizer {z['name']} v{z['version']}, this code reads "
                    f"{NAME} v{VERSION}. Re-run `python scripts/prepare_data.py --out DIR --force`."
                )
            return cls(
                z["codebook_KxD"],
                image_size=int(z["image_size"]),
                patch_size=int(z["patch_size"]),
                channels=int(z["channels"]) if "channels" in z else 1,  # grey before colour
            )
