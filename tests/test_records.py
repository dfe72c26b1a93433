"""Record serialisation, validation errors that name the record, and the vocabulary layout."""

import json

import numpy as np
import pytest

from moma_jax.data import records
from moma_jax.data.vocab import IMAGE, TEXT, Vocab

VOCAB = Vocab()


def _doc():
    v = VOCAB
    tokens = np.array([v.bos, 72, 105, v.boi, v.image_offset + 7, v.eoi, v.eos], dtype=np.int32)
    return tokens, v.modality_of(tokens)


def test_vocab_layout_and_round_trip():
    v = VOCAB
    assert (v.image_offset, v.bos, v.eos, v.boi, v.eoi, v.pad, v.size) == (
        256,
        768,
        769,
        770,
        771,
        772,
        773,
    )
    assert Vocab.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    np.testing.assert_array_equal(
        v.modality_of(np.array([0, 255, 256, 767, v.bos, v.eos, v.boi, v.eoi, v.pad])),
        [TEXT, TEXT, IMAGE, IMAGE, TEXT, TEXT, IMAGE, IMAGE, TEXT],
    )
    bad = {**v.to_dict(), "pad": 1}
    with pytest.raises(ValueError, match="prepare_data.py"):
        Vocab.from_dict(bad)


def test_serialize_round_trip():
    tokens, modality = _doc()
    data = records.serialize(42, tokens, modality)
    assert len(data) == 9 + 5 * len(tokens)  # header + int32 tokens + int8 modality
    doc = records.deserialize(data)
    assert doc.doc_id == 42
    assert doc.tokens.dtype == np.int32 and doc.modality.dtype == np.int8
    np.testing.assert_array_equal(doc.tokens, tokens)
    np.testing.assert_array_equal(doc.modality, modality)
    records.validate(doc.tokens, doc.modality, VOCAB, "ok")


def test_deserialize_names_the_record():
    data = records.serialize(1, *_doc())
    with pytest.raises(ValueError, match="shard-3 record 9.*bytes"):
        records.deserialize(data[:-1], "shard-3 record 9")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t, m: (np.append(t, 5000), np.append(m, TEXT)), "token id 5000 at position 7"),
        (lambda t, m: (np.append(t, -1), np.append(m, TEXT)), "token id -1 at position 7"),
        (lambda t, m: (np.append(t, VOCAB.pad), np.append(m, TEXT)), "PAD"),
        (lambda t, m: (t, np.where(np.arange(len(m)) == 2, 7, m)), "modality id 7 at position 2"),
        (lambda t, m: (t, m[:-1]), "equal length"),
        (lambda t, m: (t[:0], m[:0]), "empty record"),
        (lambda t, m: (t, np.full_like(m, TEXT)), "position 3 has modality text"),
    ],
)
def test_validate_errors_name_record_problem_and_fix(mutate, expected):
    tokens, modality = mutate(*_doc())
    with pytest.raises(ValueError, match="train-00001 record 17") as err:
        records.validate(tokens, modality, VOCAB, "train-00001 record 17")
    assert expected in str(err.value)
    assert "prepare_data.py" in str(err.value)
