"""Causal sampling with a KV cache: the prompt, the data's grammar, the sampler, the decoder.

The library behind `scripts/generate.py` and `analysis.generate`. Every token is decided causally
(`model/aux_router.py`: expert choice and Mixture-of-Depths by their aux routers). Sampling keeps
the data's grammar: after BOI exactly `codes_per_image` image codes (from the manifest), then EOI;
outside an image text, BOI or EOS, and BOI only where a whole image still fits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moma_jax import data as data_lib
from moma_jax.config import ConfigError, ExperimentConfig
from moma_jax.data import text_tokenizers
from moma_jax.data.images import load_image
from moma_jax.model import Transformer, kinds


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy; top_k 0 and top_p 1: off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class Grammar:
    """Which tokens may come next, from the tokens so far (see the module docstring)."""

    def __init__(self, vocab: data_lib.Vocab, codes_per_image: int, size: int):
        """`size`: the model's vocabulary (>= the data's; ids past the data's never occur)."""
        self.vocab, self.codes = vocab, codes_per_image
        v = vocab
        self.text = np.zeros(size, bool)
        self.text[: v.n_text] = True
        self.text[v.eos] = True
        self.image = np.zeros(size, bool)
        self.image[v.image_offset : v.image_offset + v.n_image_codes] = True
        self.eoi = np.zeros(size, bool)
        self.eoi[v.eoi] = True

    def allowed(self, tokens: list[int], remaining: int) -> np.ndarray:
        v = self.vocab
        opened = max((i for i, t in enumerate(tokens) if t == v.boi), default=-1)
        closed = max((i for i, t in enumerate(tokens) if t == v.eoi), default=-1)
        if opened > closed:  # inside an image
            return self.image if len(tokens) - opened - 1 < self.codes else self.eoi
        mask = self.text.copy()
        mask[v.boi] = remaining >= self.codes + 2
        return mask


def sample(logits_V: np.ndarray, allowed_V: np.ndarray, s: Sampling, rng) -> int:
    """One token from `logits_V` restricted to `allowed_V` (float64 on the host)."""
    logits = np.where(allowed_V, logits_V.astype(np.float64), -np.inf)
    if s.temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = np.sort(logits)[-min(s.top_k, int(allowed_V.sum()))]
        logits = np.where(logits >= kth, logits, -np.inf)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if s.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < s.top_p  # the smallest nucleus
        nucleus = np.zeros_like(probs)
        nucleus[order[keep]] = probs[order[keep]]
        probs = nucleus / nucleus.sum()
    return int(rng.choice(len(probs), p=probs))


def encode_prompt(
    text: str, image: str | None, tokens: list[int] | None, data_dir: Path
) -> list[int]:
    """BOS, [BOI codes EOI], text -- or raw ids (`tokens`), checked against the vocabulary."""
    manifest = data_lib.load_manifest(data_dir)
    vocab = data_lib.Vocab.from_dict(manifest["vocab"])
    if tokens is not None:
        bad = [t for t in tokens if not 0 <= t < vocab.size or t == vocab.pad]
        if bad:
            raise ConfigError(
                f"prompt tokens {bad[:5]} are outside the vocabulary: ids must lie in "
                f"[0, {vocab.size}) and not be padding ({vocab.pad})"
            )
        if not tokens:
            raise ConfigError("the prompt is empty: give --prompt TEXT, --image or --tokens")
        return list(tokens)
    if not text and not image:
        raise ConfigError("the prompt is empty: give --prompt TEXT, --image PATH or both")
    out = [vocab.bos]
    if image:
        geometry = manifest["image"]
        pixels = load_image(Path(image), geometry["shape"][0], geometry["channels"], "--image", 0)
        codes = data_lib.load_image_tokenizer(data_dir).encode(pixels[None])[0]
        out += [vocab.boi, *(int(c) + vocab.image_offset for c in codes), vocab.eoi]
    if text:
        tokenizer = text_tokenizers.load(manifest["text_tokenizer"], data_dir)
        out += [int(t) for t in tokenizer.encode(text)]
    return out


class Decoder:
    """The run's model as a cached causal decoder over B rows: `feed` appends one column of
    tokens (a prompt block, then one token per row) to every row at once.

    Rows of different lengths are left-padded: a padding position has segment 0, so it is
    never present in any layer's cache (`model/cache.py`) and no real token sees it; each row's
    positions count its own tokens from 0, so a row decodes exactly as it would alone."""

    def __init__(self, model: Transformer, vocab: data_lib.Vocab, length: int, batch: int = 1):
        self.graphdef, self.state = nnx.split(model)
        self.vocab = vocab
        self.cache = model.init_cache(batch, length)
        modality_V = jnp.asarray(vocab.modality_of(np.arange(model.cfg.vocab_size)), jnp.int32)

        @jax.jit
        def forward(state, tokens_BxT, present_BxT, positions_BxT, cache, index):
            logits, aux = nnx.merge(self.graphdef, state)(
                tokens_BxT,
                present_BxT.astype(jnp.int32),
                positions_BxT,
                modality_V[tokens_BxT],
                routing="causal",
                cache=cache,
                cache_index=index,
            )
            return logits, aux["cache"]

        self._forward = forward
        self.index = 0

    def feed(
        self,
        tokens: list[int] | np.ndarray,
        present: np.ndarray | None = None,
        positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """Appends `tokens` ([T] for one row, or [B, T]); `present` [B, T] marks the real ones
        (default: all) and `positions` [B, T] their positions in their rows (default: the
        cache index onwards). Returns their logits [T, V] for one row, else [B, T, V]."""
        ids = np.asarray(tokens, np.int32)
        one_row = ids.ndim == 1
        ids = ids[None] if one_row else ids
        if present is None:
            present = np.ones(ids.shape, bool)
        if positions is None:
            positions = np.broadcast_to(self.index + np.arange(ids.shape[1]), ids.shape)
        logits, self.cache = self._forward(
            self.state,
            jnp.asarray(ids),
            jnp.asarray(present),
            jnp.asarray(positions, jnp.int32),
            self.cache,
            jnp.int32(self.index),
        )
        self.index += ids.shape[1]
        out = np.asarray(logits)
        return out[0] if one_row else out


def generate(
    model: Transformer,
    cfg: ExperimentConfig,
    prompt: list[int],
    max_tokens: int,
    sampling: Sampling = Sampling(),
) -> dict[str, Any]:
    """Samples up to `max_tokens` after `prompt` from `model` (the run of `cfg`); returns the
    tokens, the logits each sampled token was drawn from ([N, V], before the grammar), and the
    codes of every image the sampled tokens complete."""
    return generate_batch(model, cfg, [prompt], max_tokens, sampling)[0]


def generate_batch(
    model: Transformer,
    cfg: ExperimentConfig,
    prompts: list[list[int]],
    max_tokens: int,
    sampling: Sampling = Sampling(),
) -> list[dict[str, Any]]:
    """`generate` for several prompts of any lengths at once, one cached forward pass per
    generated column: row r is exactly `generate(prompts[r])` with seed `sampling.seed + r`
    (each row its own grammar, sampler and stop at EOS) whenever the context does not bind.
    Every row gets up to `max_tokens`, capped so that the longest prompt and its tokens fit
    the model's context (data.seq_len): a shorter prompt alone could be given more."""
    kinds.require_for_causal(cfg)
    if not prompts or not all(prompts):
        raise ConfigError("every prompt needs at least one token")
    data_dir = data_lib.ensure_data(cfg.data.path or None)
    manifest = data_lib.load_manifest(data_dir)
    vocab = data_lib.Vocab.from_dict(manifest["vocab"])
    context, longest = cfg.data.seq_len, max(len(p) for p in prompts)
    if longest >= context:
        raise ConfigError(
            f"a prompt has {longest} tokens and the model's context is {context} "
            "(data.seq_len): shorten it so at least one token can follow"
        )
    max_tokens = min(max_tokens, context - longest)
    grammar = Grammar(vocab, manifest["image"]["codes_per_image"], cfg.model.vocab_size)
    rows = len(prompts)
    decoder = Decoder(model, vocab, longest + max_tokens, rows)
    rngs = [np.random.default_rng(sampling.seed + r) for r in range(rows)]
    # Left padding: row r's prompt ends at column `longest - 1`, its positions start at 0.
    pad = np.array([longest - len(p) for p in prompts])
    block = np.full((rows, longest), vocab.pad, np.int32)
    for r, p in enumerate(prompts):
        block[r, pad[r] :] = p
    columns = np.arange(longest)[None]
    logits_BxV = decoder.feed(block, columns >= pad[:, None], np.maximum(columns - pad[:, None], 0))
    logits_BxV = logits_BxV[:, -1]
    tokens = [list(p) for p in prompts]
    logits_rows: list[list[np.ndarray]] = [[] for _ in prompts]
    done = np.zeros(rows, bool)
    for i in range(max_tokens):
        column = np.full(rows, vocab.pad, np.int32)
        for r in np.flatnonzero(~done).tolist():
            logits_rows[r].append(logits_BxV[r])
            allowed = grammar.allowed(tokens[r], max_tokens - i)
            column[r] = sample(logits_BxV[r], allowed, sampling, rngs[r])
            tokens[r].append(int(column[r]))
            done[r] = column[r] == vocab.eos or i == max_tokens - 1
        if done.all():
            break
        positions = np.array([len(t) - 1 for t in tokens])
        logits_BxV = decoder.feed(column[:, None], ~done[:, None], positions[:, None])[:, -1]
        # A row that stopped feeds padding (never present) from here on; its tokens are final.
    results = []
    for r, prompt in enumerate(prompts):
        new = tokens[r][len(prompt) :]
        results.append(
            {
                "prompt": prompt,
                "tokens": new,
                "logits": np.stack(logits_rows[r]),
                # Images completed by the sampled tokens (a prompt may end inside one).
                "images": images(tokens[r], vocab, grammar.codes)[
                    len(images(prompt, vocab, grammar.codes)) :
                ],
            }
        )
    return results


def decode(result: dict[str, Any], data_dir: Path) -> tuple[str, list[np.ndarray]]:
    """A `generate` result's text (its text tokens through the dataset's text tokenizer) and
    images (pixels in [0, 1], through the dataset's image tokenizer)."""
    manifest = data_lib.load_manifest(data_dir)
    vocab = data_lib.Vocab.from_dict(manifest["vocab"])
    tokenizer = text_tokenizers.load(manifest["text_tokenizer"], data_dir)
    text = tokenizer.decode(np.asarray([t for t in result["tokens"] if t < vocab.n_text]))
    if not result["images"]:
        return text, []
    decoder = data_lib.load_image_tokenizer(data_dir)
    return text, [np.clip(decoder.decode(c[None])[0], 0.0, 1.0) for c in result["images"]]


def images(tokens: list[int], vocab: data_lib.Vocab, codes: int) -> list[np.ndarray]:
    """The codes of every complete image among `tokens` (BOI, `codes` codes, EOI)."""
    out = []
    for i, t in enumerate(tokens):
        if t == vocab.boi and i + codes + 1 < len(tokens) and tokens[i + codes + 1] == vocab.eoi:
            out.append(np.asarray(tokens[i + 1 : i + 1 + codes]) - vocab.image_offset)
    return out
