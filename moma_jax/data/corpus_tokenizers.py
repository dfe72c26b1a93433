"""The tokenizers of a corpus preparation (`corpus.py`): trained or copied into the dataset
directory before any shard is written, from a seeded reservoir sample of the documents."""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moma_jax.data import inputs, outdir, text_tokenizers
from moma_jax.data.corpus_options import Options
from moma_jax.data.image_tokenizer import ImageTokenizer, image_to_patches
from moma_jax.data.images import ExternalCodes, load_image
from moma_jax.data.outdir import TOKENIZER_FILE, TOKENIZERS
from moma_jax.data.vocab import Vocab


@dataclasses.dataclass
class Tokenizers:
    text: Any  # text_tokenizers.TextTokenizer
    image: ImageTokenizer | None  # the k-means codebook (None: external codes or no images)
    external: ExternalCodes | None
    vocab: Vocab

    @property
    def codes_per_image(self) -> int:
        if self.external:
            return self.external.codes_per_image
        return 0 if self.image is None else self.image.codes_per_image


def _sample(opts: Options, paths: list[Path], text: bool, images: bool) -> tuple[list, list]:
    """Seeded reservoir samples of text documents and image files, in one streaming pass."""
    rng = np.random.default_rng([opts.seed, zlib.crc32(b"tokenizer-sample")])
    budget = min(opts.tokenizer_sample_bytes, opts.max_memory // 4)
    n_texts = max(1, budget // opts.max_doc_bytes)
    pixels = opts.image_size**2 * opts.image_channels * 4
    n_images = max(1, min(opts.codebook_images, opts.max_memory // (4 * pixels)))
    texts: list[str] = []
    image_refs: list[tuple[Path, str, int]] = []
    seen = {"text": 0, "image": 0}
    for raw in inputs.scan(paths, opts.max_doc_bytes, opts.max_record_bytes):
        try:
            items = inputs.parse(raw, opts.rules)
        except inputs.BadRecordError:
            continue  # reported by the main pass
        for kind, value in items:
            if kind == "text" and text and value:
                value = value.encode()[: opts.max_doc_bytes].decode(errors="ignore")
                _reservoir(texts, value, seen, "text", n_texts, rng)
            elif kind == "image" and images:
                _reservoir(image_refs, (value, raw.source, raw.line), seen, "image", n_images, rng)
    return texts, image_refs


def _reservoir(sample: list, item: Any, seen: dict, kind: str, cap: int, rng) -> None:
    """Algorithm R: after n items each is in `sample` with probability cap / n."""
    seen[kind] += 1
    if len(sample) < cap:
        sample.append(item)
    else:
        slot = int(rng.integers(seen[kind]))
        if slot < cap:
            sample[slot] = item


def make_tokenizers(opts: Options, paths: list[Path], out: Path, log: Callable) -> Tokenizers:
    """Train (or copy) the tokenizers into `out`, before any shard is written."""
    kind, arg = text_tokenizers.parse_choice(opts.text_tokenizer)
    external = opts.external
    need_codebook = external is None
    texts, image_refs = (
        _sample(opts, paths, text=kind == "bpe", images=need_codebook)
        if kind == "bpe" or need_codebook
        else ([], [])
    )
    text: Any
    if kind == "bytes":
        text = text_tokenizers.Bytes()
    elif kind == "bpe":
        log(f"training a byte-level BPE of {arg} ids on {len(texts)} sampled documents")
        text = text_tokenizers.train_bpe(texts, arg, out / text_tokenizers.TOKENIZER_JSON)
    else:
        text = text_tokenizers.from_file(arg, out)
    image = None
    arrays = []
    if need_codebook and image_refs:
        log(f"fitting the {opts.image_codebook}-code image codebook on {len(image_refs)} images")
        for path, source, line in image_refs:
            try:
                arrays.append(
                    load_image(
                        path,
                        opts.image_size,
                        opts.image_channels,
                        source,
                        line,
                        opts.max_image_pixels,
                    )
                )
            except inputs.BadRecordError:
                continue  # reported by the main pass
    if arrays:
        patches = image_to_patches(np.stack(arrays), opts.patch_size)
        if len(arrays) * patches.shape[1] < opts.image_codebook:
            raise ValueError(
                f"{len(arrays)} readable images give {len(arrays) * patches.shape[1]} patches, "
                f"fewer than the --image-codebook {opts.image_codebook} codes to fit; lower "
                "--image-codebook, or add images."
            )
        image = ImageTokenizer.fit(
            patches.reshape(-1, patches.shape[-1]),
            n_codes=opts.image_codebook,
            patch_size=opts.patch_size,
            image_size=opts.image_size,
            channels=opts.image_channels,
            seed=opts.seed,
        )
        with outdir.replacing(out / TOKENIZER_FILE) as tmp:
            image.save(tmp)
    n_codes = external.n_codes if external else opts.image_codebook
    vocab = Vocab(n_text=text.n_text, n_image_codes=n_codes)
    return Tokenizers(text, image, external, vocab)


def load_tokenizers(opts: Options, out: Path) -> Tokenizers:
    """The tokenizers `make_tokenizers` wrote (in a worker, or on resume)."""
    entry = json.loads((out / TOKENIZERS).read_text())
    text = text_tokenizers.load(entry["text"], out)
    image = ImageTokenizer.load(out / TOKENIZER_FILE) if (out / TOKENIZER_FILE).is_file() else None
    external = opts.external
    n_codes = external.n_codes if external else opts.image_codebook
    return Tokenizers(text, image, external, Vocab(n_text=text.n_text, n_image_codes=n_codes))
