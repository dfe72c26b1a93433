"""The large bundle's extra sources: every usable font of matplotlib's wheel, captioned with the
font's name, and the standard library's docstrings read without importing anything."""

import importlib

import numpy as np

from moma_jax.data import sources


def test_font_glyphs_name_their_font():
    paths = sources.font_paths()
    names = {p.name for p in paths}
    assert "DejaVuSerif-Bold.ttf" in names and "cmr10.ttf" in names
    assert not any(n.startswith(("LastResort", "STIXNonUni", "cmex10", "cmsy10")) for n in names)
    images, captions = sources.load_font_glyphs()
    assert images.shape[1:] == (28, 28) and len(images) == len(captions) > 50_000
    assert (
        images.min() >= 0
        and images.max() <= 1
        and np.all(images.reshape(len(images), -1).max(1) > 0)
    )
    assert "dejavu serif bold: latin capital letter a" in captions
    assert "cmr10: digit seven" in captions


def test_stdlib_docstrings_are_read_not_imported():
    docs = dict(sources.load_stdlib_docstrings())
    assert "json.decoder" in docs and "json.decoder.JSONDecoder.decode\n" in docs["json.decoder"]
    assert not any(m.startswith("test.") or ".tests." in m for m in docs)
    assert sum(len(t) for t in docs.values()) > 1_000_000


def test_the_large_bundle_is_prepared_beside_the_standard_one(tmp_path, monkeypatch):
    prep = importlib.import_module("moma_jax.data.prepare")  # the module, not the function

    calls = []

    def fake_prepare(path, bundle):
        calls.append((path, bundle))
        path.mkdir(parents=True)
        (path / prep.MANIFEST).write_text("{}")

    monkeypatch.setenv("MOMA_JAX_DATA_DIR", str(tmp_path / "bundled-v1"))
    monkeypatch.setattr(prep, "prepare", fake_prepare)
    path = prep.ensure_data("bundled-large")
    assert path == tmp_path / "bundled-large-v1" and calls == [(path, "large")]
    assert prep.ensure_data("bundled-large") == path and len(calls) == 1  # prepared once
