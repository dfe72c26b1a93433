"""Mixed-modal data: vocabulary, tokenizers, record format, dataset preparation, Grain pipeline."""

from moma_jax.data.image_tokenizer import ImageTokenizer
from moma_jax.data.packing import RowPacker, pack_documents
from moma_jax.data.pipeline import document_dataset, eval_batches, make_train_iterator
from moma_jax.data.prepare import (
    content_differences,
    default_data_dir,
    ensure_data,
    load_image_tokenizer,
    load_manifest,
    prepare,
    prepared_manifest,
)
from moma_jax.data.records import Document, deserialize, serialize, validate
from moma_jax.data.vocab import Vocab
from moma_jax.modality import IMAGE, MODALITY_NAMES, TEXT

__all__ = [
    "IMAGE",
    "MODALITY_NAMES",
    "TEXT",
    "Document",
    "ImageTokenizer",
    "RowPacker",
    "Vocab",
    "content_differences",
    "default_data_dir",
    "deserialize",
    "document_dataset",
    "ensure_data",
    "eval_batches",
    "load_image_tokenizer",
    "load_manifest",
    "make_train_iterator",
    "pack_documents",
    "prepare",
    "prepared_manifest",
    "serialize",
    "validate",
]
