"""Tokenising documents in fixed chunks, in this process or in worker processes.

Documents are grouped into chunks of at most `_CHUNK_DOCS` documents (or fewer, when long) and
each chunk is encoded sentence by sentence (see `documents.split_sentences`), so sentence starts
are exact token positions. With workers, chunks are encoded in spawned processes, a few tasks per
worker in flight, and handed back in input order: the result does not depend on the number of
workers.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np

from data_pipeline.documents import DocumentReader, split_sentences
from data_pipeline.tokenizers import Tokenizer

_CHUNK_DOCS = 512  # documents per encoding task
_CHUNK_CHARS = 4 << 20  # ... or fewer, when they are long (bounds a task's memory)
_TASKS_PER_WORKER = 2  # encoding tasks in flight per worker process


class EncodedChunk(NamedTuple):
    """Non-empty documents of one chunk, each as tokens and sentence starts, concatenated."""

    indices: np.ndarray  # int64 [docs]: input index of each kept document
    doc_tokens: np.ndarray  # int64 [docs]: its token count
    tokens: np.ndarray  # dtype [sum(doc_tokens)]
    doc_sentences: np.ndarray  # int64 [docs]: its number of sentences
    sent_starts: np.ndarray  # int32 [sum(doc_sentences)]: start of each, relative to its doc
    skipped: int  # empty (whitespace only) documents left out


def _encode_chunk(
    tokenizer: Tokenizer, texts: Sequence[str], *, first_index: int, dtype: np.dtype
) -> EncodedChunk:
    """Tokenise documents first_index, first_index + 1, ... sentence by sentence."""
    kept, sentences, per_doc = [], [], []
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"document {first_index + k} is {type(text).__name__}, not str")
        if text.strip():
            parts = split_sentences(text)
            kept.append(first_index + k)
            sentences += parts
            per_doc.append(len(parts))
    if not kept:
        empty = np.zeros(0, dtype=np.int64)
        return EncodedChunk(
            empty, empty, np.zeros(0, dtype), empty, empty.astype(np.int32), len(texts)
        )
    ids, lens = tokenizer.encode_concat(sentences)
    tokens = ids.astype(dtype)
    per_doc_n = np.asarray(per_doc, dtype=np.int64)
    sent_doc = np.repeat(np.arange(len(kept)), per_doc_n)
    first_of_doc = np.cumsum(per_doc_n) - per_doc_n
    sent_begin = np.cumsum(lens) - lens  # in the chunk's token stream
    doc_tokens = np.add.reduceat(lens, first_of_doc)
    # A sentence that encodes to nothing (e.g. only characters a normalizer drops) has no
    # start; a document with no tokens at all still starts one at 0 (its <eos>).
    is_first = np.zeros(len(lens), dtype=bool)
    is_first[first_of_doc] = True
    keep = (lens > 0) | (is_first & (doc_tokens[sent_doc] == 0))
    starts = sent_begin - sent_begin[first_of_doc][sent_doc]
    return EncodedChunk(
        indices=np.asarray(kept, dtype=np.int64),
        doc_tokens=doc_tokens,
        tokens=tokens,
        doc_sentences=np.bincount(sent_doc[keep], minlength=len(kept)).astype(np.int64),
        sent_starts=starts[keep].astype(np.int32),
        skipped=len(texts) - len(kept),
    )


class DocumentChunk(NamedTuple):
    """Consecutive input documents, encoded as one task."""

    first_index: int  # input index of the first
    texts: list[str]
    bytes_read: int | None  # input position after its last document, when known


def chunk_documents(documents: Iterable[str]) -> Iterator[DocumentChunk]:
    """`documents` in chunks of at most _CHUNK_DOCS documents or about _CHUNK_CHARS characters
    (a DocumentReader also reports how far into its input each chunk ends)."""
    reader = documents if isinstance(documents, DocumentReader) else None
    texts: list[str] = []
    chars, first = 0, 0
    for text in documents:
        texts.append(text)
        chars += len(text) if isinstance(text, str) else 0
        if len(texts) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield DocumentChunk(first, texts, reader.bytes_read if reader else None)
            first += len(texts)
            texts, chars = [], 0
    if texts:
        yield DocumentChunk(first, texts, reader.bytes_read if reader else None)


_WORKER_STATE: dict = {}


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
    _WORKER_STATE["tokenizer"], _WORKER_STATE["dtype"] = tokenizer, np.dtype(dtype)


def _encode_in_worker(texts: list[str], first_index: int) -> EncodedChunk:
    return _encode_chunk(
        _WORKER_STATE["tokenizer"],
        texts,
        first_index=first_index,
        dtype=_WORKER_STATE["dtype"],
    )


def encode_chunks(
    chunks: Iterator[DocumentChunk], tokenizer: Tokenizer, *, dtype: np.dtype, workers: int
) -> Iterator[tuple[DocumentChunk, EncodedChunk]]:
    """Each chunk with its encoding, in input order, encoded by `workers` processes."""
    if workers == 1:
        for chunk in chunks:
            enc = _encode_chunk(tokenizer, chunk.texts, first_index=chunk.first_index, dtype=dtype)
            yield chunk, enc
        return
    # spawn, not fork: the parent may hold threads (torch, the tokenizers thread pool) whose
    # locks a forked child would inherit in a held state. An executor rather than
    # multiprocessing.Pool, which silently replaces a worker that dies and then waits forever.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tokenizer, dtype.name),
    )
    pending: deque = deque()
    try:
        for chunk in chunks:  # submitted lazily: at most a few tasks per worker in memory
            future = pool.submit(_encode_in_worker, chunk.texts, chunk.first_index)
            pending.append((chunk, future))
            if len(pending) >= _TASKS_PER_WORKER * workers:
                done, future = pending.popleft()
                yield done, _worker_result(future)
        while pending:
            done, future = pending.popleft()
            yield done, _worker_result(future)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_result(future) -> EncodedChunk:
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise RuntimeError(
            "a tokenizer worker process died: killed, out of memory, or started from a script "
            "without an `if __name__ == '__main__':` guard (spawned workers import the main "
            "module); run with workers=1 (--workers 1) to see any error in this process"
        ) from err
