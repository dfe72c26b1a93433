"""`scripts/generate.py`: sample text and images from a run, causally, with a KV cache.

    python scripts/generate.py --workdir runs/mod_moma_4t4i_aux_tiny --prompt "A 7" \
        --max-tokens 80 --temperature 0.8 --top-k 50 --out samples/

The prompt is BOS, then the image of `--image` (BOI, its codes, EOI) if given, then the text
(or raw ids with `--tokens`). `moma_jax.sampling` decides every token causally (a run whose
routers rank routing groups needs aux routers, and is refused with the command that trains
them) and keeps the data's grammar, so every image has exactly the manifest's number of codes.
Generation stops at EOS or after `--max-tokens`. Every generated image is decoded through the
dataset's image tokenizer to a PNG in `--out`, beside `generation.json`.

`--prompt` given several times samples the prompts as one batch (`sampling.generate_batch`:
row r is what the prompt alone gives with seed `--seed` + r), each after `--image` when given,
into `--out`/sample_{r}/:

    python scripts/generate.py --workdir runs/mod_moma_4t4i_aux_tiny --prompt "A 7" \
        --prompt "ROMEO." --max-tokens 40 --out samples/
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moma_jax import data as data_lib
from moma_jax.analysis import Run, load_run
from moma_jax.commands import hints
from moma_jax.config import ConfigError
from moma_jax.model import aux_router, kinds
from moma_jax.runtime import (
    add_experiments_module_arg,
    enable_compilation_cache,
    load_experiment_modules,
)
from moma_jax.safe_io import refuse_symlink, write_atomic, write_atomic_bytes
from moma_jax.sampling import Sampling, decode, encode_prompt, generate_batch


def write_outputs(run: Run, result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Text decoded, each generated image decoded to out/image_{i}.png, and generation.json.

    The images an earlier sample listed in out/generation.json are removed first (ours: no
    stale image is left beside the new summary); nothing else in `out` is touched, and no file
    is written through a symlink."""
    from PIL import Image

    text, pictures = decode(result, data_lib.ensure_data(run.config.data.path or None))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (it is created if needed)")
    out.mkdir(parents=True, exist_ok=True)
    summary_file = out / "generation.json"
    refuse_symlink(summary_file)
    earlier = _earlier_images(summary_file)
    theirs = [out / f"image_{i}.png" for i in range(len(pictures))]
    if clash := [p.name for p in theirs if p.exists() and p not in earlier]:
        raise ConfigError(
            f"--out {out} holds {', '.join(clash)}, which no earlier generate wrote; choose "
            "another --out (nothing was written)"
        )
    for stale in earlier:
        stale.unlink(missing_ok=True)
    pngs = []
    for i, pixels in enumerate(pictures):
        path = out / f"image_{i}.png"
        buffer = io.BytesIO()
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buffer, format="PNG")
        write_atomic_bytes(path, buffer.getvalue())
        pngs.append(str(path))
    summary = {"text": text, "tokens": result["tokens"], "images": pngs}
    write_atomic(summary_file, json.dumps(summary, indent=2) + "\n")
    return summary


def _earlier_images(summary_file: Path) -> list[Path]:
    """The image files an earlier generate wrote into this directory (from its summary)."""
    try:
        listed = json.loads(summary_file.read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    folder = summary_file.parent
    names = [Path(p).name for p in listed if isinstance(p, str)]
    return [folder / n for n in names if re.fullmatch(r"image_\d+\.png", n)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    add_experiments_module_arg(p)  # the modules that registered the run's kinds or routers
    p.add_argument(
        "--prompt",
        action="append",
        help="text after the image (if any); repeat it to sample several prompts as one batch",
    )
    p.add_argument("--image", help="an image file the prompt starts with")
    p.add_argument("--tokens", help="the prompt as comma-separated token ids instead")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="directory for the PNGs and generation.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_tokens < 1 or not 0 < args.top_p <= 1 or args.top_k < 0:
            raise ConfigError("--max-tokens must be >= 1, --top-p in (0, 1], --top-k >= 0")
        enable_compilation_cache()
        load_experiment_modules(args)
        run = load_run(args.workdir)
        if not run.steps:
            raise ConfigError(f"{args.workdir} has no checkpoint yet")
        kinds.require_for_causal(run.config, run.workdir)
        ids = None
        if args.tokens is not None:
            try:
                ids = [int(t) for t in args.tokens.split(",") if t.strip()]
            except ValueError:
                raise ConfigError(
                    f"--tokens {args.tokens!r}: expected ids like 768,72,105"
                ) from None
        texts = args.prompt or [""]
        if ids is not None and args.prompt:
            raise ConfigError("--tokens is the whole prompt: give it without --prompt")
        data_dir = data_lib.ensure_data(run.config.data.path or None)
        prompts = [encode_prompt(t, args.image, ids, data_dir) for t in texts]
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        model = run.model(args.step)
        results = generate_batch(model, run.config, prompts, args.max_tokens, sampling)
        outs = (
            [Path(args.out)]
            if len(prompts) == 1
            else [Path(args.out) / f"sample_{r}" for r in range(len(prompts))]
        )
        summaries = [write_outputs(run, r, o) for r, o in zip(results, outs, strict=True)]
    except aux_router.NoAuxRoutersError as e:
        print(f"error: {e}\n{hints.train_aux_routers(e)}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, OSError) as e:  # OSError: --out unwritable or odd
        print(f"error: {e}", file=sys.stderr)
        return 2
    for summary, result, out in zip(summaries, results, outs, strict=True):
        print(summary["text"])
        for path in summary["images"]:
            print(f"image: {path}")
        print(f"({len(result['tokens'])} tokens; {out / 'generation.json'})")
    return 0
