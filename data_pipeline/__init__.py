"""Loom's data path: tokenizers, corpus preparation, packed-row reading and objectives."""

from data_pipeline.config import DataConfig
from data_pipeline.dataset import DistributedBatchIterator, PackedDataset, sample_order
from data_pipeline.objectives import OBJECTIVES, clm_batch, get_objective
from data_pipeline.prepare import (
    CorpusExistsError,
    load_manifest,
    prepare_corpus,
    read_documents,
)
from data_pipeline.sample_corpus import ensure_sample_corpus, sample_documents
from data_pipeline.tokenizers import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "OBJECTIVES",
    "SPECIAL_TOKENS",
    "ByteTokenizer",
    "CorpusExistsError",
    "DataConfig",
    "DistributedBatchIterator",
    "PackedDataset",
    "Tokenizer",
    "build_tokenizer",
    "clm_batch",
    "ensure_sample_corpus",
    "get_objective",
    "load_manifest",
    "load_tokenizer",
    "prepare_corpus",
    "read_documents",
    "sample_documents",
    "sample_order",
]
