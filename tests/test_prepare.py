"""Dataset preparation: manifest content, data directory resolution, atomic commit, the records
digest, and the manifest keys that make two datasets other data."""

import json
import math
from typing import Any

import pytest

from moma_jax import data as data_lib
from moma_jax.data import default_data_dir, ensure_data, load_manifest, prepare
from moma_jax.data.prepare import MANIFEST, _commit
from moma_jax.data.vocab import Vocab


def test_manifest_content(data_dir):
    m = load_manifest(data_dir)
    vocab = Vocab.from_dict(m["vocab"])
    assert (vocab.n_text, vocab.n_image_codes, vocab.size) == (256, 512, 773)
    assert m["image"] == {"shape": [28, 28], "channels": 1, "patch_size": 4, "codes_per_image": 49}
    assert m["image_tokenizer"]["n_codes"] == vocab.n_image_codes
    assert (data_dir / m["image_tokenizer"]["file"]).is_file()
    assert m["text_tokenizer"]["name"] == "byte-utf8"
    assert set(m["sources"]) == {"mnist", "dejavu", "shakespeare", "pydoc"}
    assert all(s["license"] and s["documents"] > 0 for s in m["sources"].values())
    total = 0
    for split in ("train", "heldout"):
        info = m["splits"][split]
        print(split, info["records"], "records", info["tokens"], "tokens", info["modality_shares"])
        assert math.isclose(sum(info["modality_shares"].values()), 1.0)
        assert sum(info["modality_tokens"].values()) == info["tokens"]
        assert sum(info["shard_records"]) == info["records"]
        assert sum(info["documents_by_source"].values()) == info["records"]
        assert all((data_dir / s).is_file() for s in info["shards"])
        assert 0.15 < info["modality_shares"]["image"] < 0.5  # images are not drowned out
        total += info["records"]
    assert total == sum(s["documents"] for s in m["sources"].values())
    assert 0.04 < m["splits"]["heldout"]["records"] / total < 0.06


def test_prepare_reuses_a_matching_dataset_and_refuses_other_settings(data_dir):
    m = load_manifest(data_dir)
    assert prepare(data_dir, seed=m["seed"], max_text_chars=m["max_text_chars"]) == m
    with pytest.raises(ValueError, match="--force"):
        prepare(data_dir, seed=m["seed"] + 1, max_text_chars=m["max_text_chars"])


def test_user_named_missing_dir_gives_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"nowhere.*python scripts/prepare_data.py --out"):
        ensure_data(str(missing))
    with pytest.raises(ValueError, match="prepare_data.py"):
        load_manifest(tmp_path)


def test_prepare_refuses_a_non_dataset_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        prepare(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_default_data_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MOMA_JAX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "moma_jax" / "data" / "bundled-v1"
    monkeypatch.setenv("MOMA_JAX_DATA_DIR", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"


def _fake_dataset(path, tag):
    """A directory holding a manifest of ours (a JSON one: only such a dataset is replaced)."""
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"format_version": 1, "splits": {}, "tag": tag}))
    return path


def _tag(path):
    return json.loads((path / MANIFEST).read_text())["tag"]


def test_commit_is_a_rename_and_a_finished_dataset_wins(tmp_path):
    out = tmp_path / "data"
    _commit(_fake_dataset(tmp_path / "tmp1", "first"), out, force=False)
    assert _tag(out) == "first" and not (tmp_path / "tmp1").exists()
    # A concurrent prepare finishing second keeps the first dataset (same content by seed).
    _commit(_fake_dataset(tmp_path / "tmp2", "second"), out, force=False)
    assert _tag(out) == "first"
    # --force replaces it and leaves no backup behind.
    _commit(_fake_dataset(tmp_path / "tmp3", "third"), out, force=True)
    assert _tag(out) == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tmp2"]


def _write(path, payloads, options):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), options)
    for p in payloads:
        writer.write(p)
    writer.close()


def test_records_digest_is_what_the_records_hold(tmp_path):
    """The digest is the records' bytes in reading order, not the container: the same records
    written with other ArrayRecord options digest the same; one byte changed (every length and
    count the same), or two records swapped, digest differently."""
    import hashlib
    import struct

    from moma_jax.data.records import records_digest

    recs = [b"abc", b"de", b"fghij"]
    _write(tmp_path / "a0", recs[:2], "group_size:1")
    _write(tmp_path / "a1", recs[2:], "group_size:1")
    _write(tmp_path / "b0", recs[:2], "group_size:64")
    _write(tmp_path / "b1", recs[2:], "group_size:64")
    _write(tmp_path / "c0", [b"abd", b"de"], "group_size:1")
    _write(tmp_path / "d0", [b"de", b"abc"], "group_size:1")
    expect = hashlib.sha256(b"".join(struct.pack("<Q", len(r)) + r for r in recs)).hexdigest()

    def digest(*shards):
        return records_digest(tmp_path, {"train": {"shards": list(shards)}})["train"]

    assert digest("a0", "a1") == digest("b0", "b1") == expect
    assert digest("c0", "a1") != expect
    assert digest("d0", "a1") != expect


def test_a_prepared_dataset_records_its_digest(tmp_path):
    m = prepare(tmp_path / "d", max_text_chars=20_000)
    from moma_jax.data.records import records_digest

    assert set(m["records_digest"]) == {"train", "heldout"}
    assert m["records_digest"] == records_digest(tmp_path / "d", m["splits"])
    assert load_manifest(tmp_path / "d")["records_digest"] == m["records_digest"]


def test_data_content_is_what_the_tokens_depend_on():
    """A user corpus prepared again from the same files elsewhere is the same data; one prepared
    with another codebook sample or shard size is not (its options differ)."""
    opts = {"inputs": ["/a/corpus.jsonl"], "codebook_images": 4096, "shard_bytes": 1 << 26}
    here = {"options": opts, "sources": {"files": [{"path": "/a/corpus.jsonl", "mtime_ns": 1}]}}
    moved: dict[str, Any] = {
        "options": {**opts, "inputs": ["/b/corpus.jsonl"]},
        "sources": {"files": [{"path": "/b/corpus.jsonl", "mtime_ns": 2}]},
        "prepare_seconds": 3.0,
    }
    assert data_lib.content_differences(here, moved) == []
    other = {**moved, "options": {**moved["options"], "codebook_images": 2048}}
    assert data_lib.content_differences(here, other) == ["options"]
    assert data_lib.content_differences(here, {**moved, "seed": 1}) == ["seed"]
    # The records' digest: compared where both manifests hold one (older data has none).
    digest = {"train": "0" * 64, "heldout": "1" * 64}
    edited = {**digest, "train": "2" * 64}
    assert data_lib.content_differences({**here, "records_digest": digest}, moved) == []
    assert data_lib.content_differences(
        {**here, "records_digest": digest}, {**moved, "records_digest": edited}
    ) == ["records_digest"]
