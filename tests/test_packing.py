"""Greedy next-fit packing: a hand-worked example and properties on random documents."""

import numpy as np

from moma_jax.data.packing import RowPacker, pack_documents
from moma_jax.data.vocab import IMAGE, TEXT

P = 99  # pad id


def _doc(tokens, modality=TEXT):
    tokens = np.asarray(tokens, dtype=np.int32)
    return tokens, np.full(len(tokens), modality, dtype=np.int8)


def test_hand_worked_example():
    docs = [
        _doc([1, 2, 3]),  # row 0
        _doc([4, 5, 6, 7], IMAGE),  # does not fit after doc 0 -> row 1
        _doc([8, 9]),  # fits after doc 1 exactly
        _doc([10, 11, 12, 13, 14, 15]),  # exactly L -> row 2
        _doc(list(range(20, 34))),  # 14 > L: pieces of 6, 6, then 2 that later docs may join
        _doc([40]),
    ]
    rows = pack_documents(docs, seq_len=6, pad_id=P)
    np.testing.assert_array_equal(
        rows["tokens"],
        [
            [1, 2, 3, P, P, P],
            [4, 5, 6, 7, 8, 9],
            [10, 11, 12, 13, 14, 15],
            [20, 21, 22, 23, 24, 25],
            [26, 27, 28, 29, 30, 31],
            [32, 33, 40, P, P, P],
        ],
    )
    np.testing.assert_array_equal(
        rows["segment_ids"],
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 2, 2],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 2, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(
        rows["positions"],
        [
            [0, 1, 2, 0, 0, 0],
            [0, 1, 2, 3, 0, 1],
            [0, 1, 2, 3, 4, 5],
            [0, 1, 2, 3, 4, 5],
            [0, 1, 2, 3, 4, 5],
            [0, 1, 0, 0, 0, 0],
        ],
    )
    np.testing.assert_array_equal(rows["modality"][1], [IMAGE] * 4 + [TEXT] * 2)
    assert (rows["modality"][rows["segment_ids"] == 0] == TEXT).all()  # padding is text
    assert all(v.dtype == np.int32 for v in rows.values())


def _random_docs(rng, n, max_len):
    docs, start = [], 0
    for length in rng.integers(1, max_len + 1, size=n):
        docs.append(_doc(np.arange(start, start + length)))
        start += length
    return docs


def test_every_token_appears_once_in_order():
    rng = np.random.default_rng(0)
    for seq_len in (1, 5, 16, 64):
        docs = _random_docs(rng, 200, 3 * seq_len)
        rows = pack_documents(docs, seq_len=seq_len, pad_id=-1)
        seg = rows["segment_ids"]
        placed = rows["tokens"][seg > 0]
        np.testing.assert_array_equal(placed, np.concatenate([d[0] for d in docs]))
        assert (rows["tokens"][seg == 0] == -1).all()
        for r in range(len(seg)):
            ids = seg[r][seg[r] > 0]
            # segments are 1, 2, ... in order, padding only at the end, positions restart at 0
            assert (np.diff(ids) >= 0).all() and (ids[0] == 1 if len(ids) else True)
            assert (seg[r][len(ids) :] == 0).all()
            for s in np.unique(ids):
                np.testing.assert_array_equal(
                    rows["positions"][r][seg[r] == s], np.arange((seg[r] == s).sum())
                )


class _ListFeed:
    """fetch() over a list, starting at document ``start``."""

    def __init__(self, docs, start=0):
        self.docs, self.next = docs, start

    def __call__(self):
        if self.next == len(self.docs):
            return None
        self.next += 1
        return self.docs[self.next - 1]


def _rows(packer, feed):
    rows = []
    while (row := packer.next_row(feed)) is not None:
        rows.append(row["tokens"])
    return np.array(rows).reshape(-1, packer.seq_len)


def test_resume_from_offset_reproduces_the_rest():
    """(index of the document at the cursor, offset into it) is all a restart needs."""
    docs = _random_docs(np.random.default_rng(1), 60, 20)
    expected = pack_documents(docs, seq_len=8, pad_id=-1)["tokens"]
    saw_mid_document = False
    for k in range(len(expected)):
        packer, feed = RowPacker(8, -1), _ListFeed(docs)
        for _ in range(k):
            packer.next_row(feed)
        doc_index = feed.next - 1 if packer.has_head else feed.next
        saw_mid_document |= packer.offset > 0
        resumed = RowPacker(8, -1)
        resumed.reset(packer.offset)
        np.testing.assert_array_equal(_rows(resumed, _ListFeed(docs, doc_index)), expected[k:])
    assert saw_mid_document
