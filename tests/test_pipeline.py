"""Grain pipeline: shapes, determinism, Orbax checkpoint round trip, process slices, targets."""

import json
import shutil
from typing import Any

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moma_jax.data import document_dataset, eval_batches, load_manifest, make_train_iterator
from moma_jax.data.pipeline import train_documents
from moma_jax.data.vocab import TEXT, Vocab

KEYS = ("tokens", "modality", "segment_ids", "positions")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        for k in KEYS:
            np.testing.assert_array_equal(a[k], b[k])


def test_batch_shapes_dtypes_and_padding(data_dir):
    batch = next(make_train_iterator(data_dir, seq_len=128, batch_size=4, seed=0))
    assert set(batch) == set(KEYS)
    for k in KEYS:
        assert batch[k].shape == (4, 128) and batch[k].dtype == np.int32, k
    vocab = Vocab.from_dict(load_manifest(data_dir)["vocab"])
    pad = batch["segment_ids"] == 0
    assert (batch["tokens"][pad] == vocab.pad).all() and (batch["modality"][pad] == TEXT).all()
    assert (batch["tokens"][~pad] != vocab.pad).all()
    np.testing.assert_array_equal(batch["modality"][~pad], vocab.modality_of(batch["tokens"])[~pad])


def test_same_seed_same_batches_other_seed_other_order(data_dir):
    kwargs: dict[str, Any] = dict(seq_len=96, batch_size=4)
    a = _take(make_train_iterator(data_dir, seed=0, **kwargs), 4)
    b = _take(make_train_iterator(data_dir, seed=0, **kwargs), 4)
    c = _take(make_train_iterator(data_dir, seed=1, **kwargs), 4)
    _assert_same(a, b)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c, strict=True))


def test_orbax_checkpoint_round_trip(data_dir, tmp_path):
    kwargs: dict[str, Any] = dict(seq_len=64, batch_size=4, seed=0)
    it = make_train_iterator(data_dir, **kwargs)
    _take(it, 3)
    json.dumps(it.get_state())  # the state is plain JSON
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = _take(it, 2)
        fresh = make_train_iterator(data_dir, **kwargs)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(_take(fresh, 2), expected)


def test_state_mid_document_restores_exactly(data_dir):
    """Long documents split across rows: the packer's offset must survive a restore."""
    kwargs: dict[str, Any] = dict(seq_len=64, batch_size=2, seed=5)
    it = make_train_iterator(data_dir, **kwargs)
    for _ in range(200):
        next(it)
        if it.get_state()["offset"] > 0:  # grain's batch iterator exposes our state as is
            break
    state = json.loads(json.dumps(it.get_state()))
    assert state["offset"] > 0
    expected = _take(it, 3)
    fresh = make_train_iterator(data_dir, **kwargs)
    fresh.set_state(state)
    _assert_same(_take(fresh, 3), expected)


def test_process_slices_are_disjoint_and_cover_each_epoch(data_dir):
    n = load_manifest(data_dir)["splits"]["heldout"]["records"]
    epochs = []
    for epoch in range(2):
        ids = []
        for p in range(2):
            docs = train_documents(
                data_dir, split="heldout", seed=0, process_index=p, process_count=2
            )
            per_epoch = (n - p + 1) // 2
            ids.append([docs[i].doc_id for i in range(epoch * per_epoch, (epoch + 1) * per_epoch)])
        assert not set(ids[0]) & set(ids[1])
        assert sorted(ids[0] + ids[1]) == sorted(
            d.doc_id for d in document_dataset(data_dir, "heldout")
        )
        epochs.append(ids[0])
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    a = next(
        make_train_iterator(
            data_dir,
            seq_len=64,
            batch_size=4,
            seed=0,
            process_index=0,
            process_count=2,
            split="heldout",
        )
    )
    b = next(
        make_train_iterator(
            data_dir,
            seq_len=64,
            batch_size=4,
            seed=0,
            process_index=1,
            process_count=2,
            split="heldout",
        )
    )
    assert a["tokens"].shape == (2, 64) and not np.array_equal(a["tokens"], b["tokens"])


def test_no_loss_target_crosses_a_document_boundary(data_dir):
    vocab = Vocab.from_dict(load_manifest(data_dir)["vocab"])
    for batch in _take(make_train_iterator(data_dir, seq_len=128, batch_size=8, seed=0), 5):
        seg, pos, tok = batch["segment_ids"], batch["positions"], batch["tokens"]
        valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        assert valid.mean() > 0.5  # packing keeps most of the row useful
        np.testing.assert_array_equal(pos[:, 1:][valid], pos[:, :-1][valid] + 1)
        assert not (tok[:, 1:][valid] == vocab.bos).any()  # BOS only starts a document
        assert not (tok[:, :-1][valid] == vocab.eos).any()  # nothing follows EOS in its doc
        assert not (tok[:, 1:][valid] == vocab.pad).any()
        # every segment starts at position 0 (a new document or a new piece of a long one)
        starts = np.concatenate([np.ones_like(seg[:, :1], bool), ~valid], axis=1) & (seg > 0)
        assert (pos[starts] == 0).all()


def test_eval_batches_deterministic_and_stop_when_exhausted(data_dir):
    info = load_manifest(data_dir)["splits"]["heldout"]
    a = eval_batches(data_dir, seq_len=256, batch_size=8, num_batches=3)
    _assert_same(a, eval_batches(data_dir, seq_len=256, batch_size=8, num_batches=3))
    assert len(a) == 3 and a[0]["tokens"].shape == (8, 256)
    everything = eval_batches(data_dir, seq_len=256, batch_size=8, num_batches=10_000)
    assert 3 < len(everything) < 10_000
    assert sum(int((b["segment_ids"] > 0).sum()) for b in everything) == info["tokens"]
    halves = [
        eval_batches(
            data_dir, seq_len=256, batch_size=8, num_batches=3, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    np.testing.assert_array_equal(
        np.concatenate([halves[0][1]["tokens"], halves[1][1]["tokens"]]), a[1]["tokens"]
    )


def test_bad_arguments_say_what_to_change(data_dir):
    with pytest.raises(ValueError, match="multiple of process_count"):
        make_train_iterator(data_dir, seq_len=64, batch_size=3, seed=0, process_count=2)
    with pytest.raises(ValueError, match="seq_len >= 51"):
        make_train_iterator(data_dir, seq_len=50, batch_size=2, seed=0)


def test_bad_record_is_named_on_read(data_dir, tmp_path):
    """Corrupt one stored token: reading names the shard, the record and the bad value."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from moma_jax.data import records

    bad_dir = tmp_path / "bad"
    shutil.copytree(data_dir, bad_dir)
    shard = load_manifest(data_dir)["splits"]["heldout"]["shards"][0]
    reader = ArrayRecordReader(str(data_dir / shard))
    raw = reader.read_all()
    reader.close()
    doc = records.deserialize(raw[0])
    tokens = doc.tokens.copy()
    tokens[1] = 9999
    raw[0] = records.serialize(doc.doc_id, tokens, doc.modality)
    writer = ArrayRecordWriter(str(bad_dir / shard), "group_size:1")
    for r in raw:
        writer.write(r)
    writer.close()
    with pytest.raises(ValueError, match=rf"{shard} record 0 .*token id 9999 at position 1"):
        eval_batches(bad_dir, seq_len=128, batch_size=2, num_batches=1)


def test_fixed_streams_give_the_same_global_batches_on_any_process_count(data_dir):
    """data.streams=2: one process packs both streams; two processes one each; the global
    batch is the same rows in the same order, and a restored state continues identically."""

    kw: dict[str, Any] = dict(seq_len=128, batch_size=8, seed=3, streams=2)
    one = make_train_iterator(None, **kw)
    parts = [make_train_iterator(None, process_index=i, process_count=2, **kw) for i in (0, 1)]
    for _ in range(3):
        whole = next(one)
        halves = [next(p) for p in parts]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    state = one.get_state()
    expected = next(one)
    fresh = make_train_iterator(None, **kw)
    fresh.set_state(state)
    got = next(fresh)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_streams_that_do_not_fit_the_processes_are_refused(data_dir):
    with pytest.raises(
        ValueError, match=r"data.streams=3 must be a multiple of the process count 2"
    ):
        make_train_iterator(data_dir, seq_len=64, batch_size=6, seed=0, process_count=2, streams=3)
