"""Phase 3 of `scripts/bench.py`: KV-cached generation (`sampling.Decoder`) per architecture,
routed causally, at batch 1 and 8, against dense.

Each timed call resets the cache, prefills a `PROMPT`-token prompt per row (the benchmark
batch's first tokens) and feeds `NEW` tokens one column at a time (greedy, on the host, as
`sampling.generate_batch` does), so tokens/s = rows x NEW / (prefill + NEW steps). Models are
freshly initialised; expert choice and Mixture-of-Depths get jointly built aux routers (causal
routing needs them). Untrained, they decide as random routers would: an aux router's logit is
positive for about half the experts, so a one-token step runs about half of each group's experts
(only chosen experts run in decoding, `grouped.chosen_experts_apply`), where a trained one picks
about capacity / experts of them (one of four for moma_4t4i): the sparse rates here are
pessimistic for trained models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx

from moma_jax import data as data_lib
from moma_jax.config import ExperimentConfig
from moma_jax.model import Transformer
from moma_jax.model.kinds import needs_aux_routers
from moma_jax.sampling import Decoder

BATCHES = (1, 8)
PROMPT = 32
NEW = 16


def vocab_of(cfg: ExperimentConfig) -> data_lib.Vocab:
    """The vocabulary of the data `cfg` trains on (its manifest)."""
    manifest = data_lib.load_manifest(data_lib.ensure_data(cfg.data.path or None))
    return data_lib.Vocab.from_dict(manifest["vocab"])


def decode_fn(
    cfg: ExperimentConfig, vocab: data_lib.Vocab, tokens_BxL: np.ndarray, rows: int
) -> Callable[[], np.ndarray]:
    """One timed generation of NEW tokens after PROMPT for `rows` rows (see the docstring)."""
    model_cfg = cfg.model
    if needs_aux_routers(model_cfg) and model_cfg.aux_routers == "none":
        model_cfg = dataclasses.replace(model_cfg, aux_routers="joint")
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    decoder = Decoder(model, vocab, PROMPT + NEW, rows)
    prompt = np.resize(tokens_BxL[:, :PROMPT], (rows, PROMPT))
    empty = decoder.cache

    def generate() -> np.ndarray:
        decoder.cache, decoder.index = empty, 0
        logits = decoder.feed(prompt)[:, -1]
        for _ in range(NEW):
            logits = decoder.feed(np.argmax(logits, axis=-1)[:, None])[:, -1]
        return logits

    return generate


def decode_report(samples: dict[str, list[Any]], dense: str) -> dict[str, Any]:
    """tokens/s per "arch/bB" (median) and each against dense at the same batch."""
    rate = {name: NEW * int(name.rsplit("/b", 1)[1]) / float(np.median([s.wall_s for s in v]))
            for name, v in samples.items()}  # fmt: skip
    vs_dense = {
        name: r / rate[f"{dense}/b{name.rsplit('/b', 1)[1]}"]
        for name, r in rate.items()
        if not name.startswith(f"{dense}/")
    }
    return {"prompt": PROMPT, "new_tokens": NEW, "tokens_per_s": rate, "vs_dense": vs_dense}
