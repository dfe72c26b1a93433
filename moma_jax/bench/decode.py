"""Phase 3 of `scripts/bench.py`: KV-cached generation (`sampling.Decoder`) per architecture,
routed causally, at batch 1 and 8, against dense.

Two timed calls per architecture and batch: `decode_fn` resets the cache, prefills a
`PROMPT`-token prompt per row (the benchmark batch's first tokens) and feeds `NEW` tokens one
column at a time (greedy, on the host, as `sampling.generate_batch` does), so tokens/s = rows x
NEW / (prefill + NEW steps); `steps_fn` starts from the prompt's cache, kept from one prefill
before timing, and times the NEW one-token steps alone (what a long generation costs per
token, the prompt amortised). Models are
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


def _decoder(
    cfg: ExperimentConfig, vocab: data_lib.Vocab, tokens_BxL: np.ndarray, rows: int
) -> tuple[Decoder, np.ndarray]:
    """A decoder of PROMPT + NEW positions for `rows` rows (aux routers built where causal
    routing needs them) and its prompt, the batch's first tokens."""
    model_cfg = cfg.model
    if needs_aux_routers(model_cfg) and model_cfg.aux_routers == "none":
        model_cfg = dataclasses.replace(model_cfg, aux_routers="joint")
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    return Decoder(model, vocab, PROMPT + NEW, rows), np.resize(
        tokens_BxL[:, :PROMPT], (rows, PROMPT)
    )


def _steps(decoder: Decoder, logits_BxV: np.ndarray) -> np.ndarray:
    for _ in range(NEW):
        logits_BxV = decoder.feed(np.argmax(logits_BxV, axis=-1)[:, None])[:, -1]
    return logits_BxV


def decode_fn(
    cfg: ExperimentConfig, vocab: data_lib.Vocab, tokens_BxL: np.ndarray, rows: int
) -> Callable[[], np.ndarray]:
    """One timed generation of NEW tokens after PROMPT for `rows` rows (see the docstring)."""
    decoder, prompt = _decoder(cfg, vocab, tokens_BxL, rows)
    empty = decoder.cache

    def generate() -> np.ndarray:
        decoder.cache, decoder.index = empty, 0
        return _steps(decoder, decoder.feed(prompt)[:, -1])

    return generate


def steps_fn(
    cfg: ExperimentConfig, vocab: data_lib.Vocab, tokens_BxL: np.ndarray, rows: int
) -> Callable[[], np.ndarray]:
    """NEW one-token steps timed alone, each call from the same prompt cache (prefilled once,
    here, untimed)."""
    decoder, prompt = _decoder(cfg, vocab, tokens_BxL, rows)
    first = decoder.feed(prompt)[:, -1]
    prefilled = decoder.cache

    def steps() -> np.ndarray:
        decoder.cache, decoder.index = prefilled, PROMPT
        return _steps(decoder, first)

    return steps


STEPS = "/steps"  # the suffix of `steps_fn`'s samples: "arch/bB/steps"


def decode_report(samples: dict[str, list[Any]], dense: str) -> dict[str, Any]:
    """tokens/s per "arch/bB" (median; the prompt counted) and, from the "arch/bB/steps"
    samples, per one-token step alone; each against dense at the same batch."""
    rate = {}
    for name, v in samples.items():
        rows = int(name.removesuffix(STEPS).rsplit("/b", 1)[1])
        rate[name] = NEW * rows / float(np.median([s.wall_s for s in v]))
    # "arch/bB[/steps]" against "dense/bB[/steps]"
    vs = {n: r / rate[f"{dense}/{n.split('/', 1)[1]}"] for n, r in rate.items()
          if not n.startswith(f"{dense}/")}  # fmt: skip

    def part(d: dict[str, float], steps: bool) -> dict[str, float]:
        return {n.removesuffix(STEPS): r for n, r in d.items() if n.endswith(STEPS) == steps}

    out = {"prompt": PROMPT, "new_tokens": NEW,
           "tokens_per_s": part(rate, False), "vs_dense": part(vs, False)}  # fmt: skip
    if any(n.endswith(STEPS) for n in samples):
        out["step_tokens_per_s"], out["step_vs_dense"] = part(rate, True), part(vs, True)
    return out
