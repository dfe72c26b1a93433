"""A small user corpus built in the tests: JSONL (text and interleaved items), an image folder
with captions, a CSV of path,caption and a plain text file; and a JSONL of external codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "red",
    "birds",
    "sing",
    "softly",
]


def sentence(rng: np.random.Generator, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS, n)).capitalize() + "."


def write_image(path: Path, rng: np.random.Generator, size: int = 20) -> None:
    """A coloured square on a plain background (non-square sizes test the centre crop)."""
    h, w = size, size + 4
    pixels = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    y, x = rng.integers(0, h // 2, 2)
    pixels[y : y + h // 2, x : x + h // 2] = rng.integers(0, 256, 3)
    Image.fromarray(pixels).save(path)


def make_corpus(root: Path, n_docs: int = 120, seed: int = 0) -> list[Path]:
    """Files under root; returns the --input paths."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "folder").mkdir()
    (root / "csv_images").mkdir()
    lines = []
    for i in range(n_docs):
        if i % 3 == 0:
            name = f"images/{i}.png"
            write_image(root / name, rng)
            items = [{"text": sentence(rng)}, {"image": name}, {"text": sentence(rng, 5)}]
            lines.append(json.dumps({"items": items}))
        else:
            lines.append(json.dumps({"text": " ".join(sentence(rng) for _ in range(3))}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    for i in range(n_docs // 3):
        write_image(root / "folder" / f"img{i:03d}.png", rng)
        (root / "folder" / f"img{i:03d}.txt").write_text(f"A picture {sentence(rng, 4)}")
    rows = ["path,caption"]
    for i in range(n_docs // 4):
        write_image(root / "csv_images" / f"{i}.jpg", rng)
        rows.append(f"csv_images/{i}.jpg,{sentence(rng, 6)}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    paragraphs = ["\n".join(sentence(rng) for _ in range(4)) for _ in range(n_docs // 2)]
    (root / "book.txt").write_text("\n\n".join(paragraphs) + "\n")
    return [root / "docs.jsonl", root / "folder", root / "captions.csv", root / "book.txt"]


def make_codes_corpus(root: Path, n_docs: int = 80, codebook: int = 64, grid: int = 4) -> Path:
    """JSONL documents with pre-tokenized image codes (an external tokenizer's)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_docs):
        codes = rng.integers(0, codebook, grid * grid).tolist()
        items = [{"text": sentence(rng)}, {"image_codes": codes}]
        lines.append(json.dumps({"items": items if i % 2 else items[::-1]}))
    path = root / "codes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
