"""Tokenising documents in fixed chunks, in this process or in worker processes.

Documents are grouped into chunks of at most `_CHUNK_DOCS` documents (or fewer, when long) and
each chunk is encoded sentence by sentence (see `documents.split_sentences`), so sentence starts
are exact token positions. With workers, chunks are encoded in spawned processes, a few tasks per
worker in flight, and handed back in input order: the result does not depend on the number of
workers.

With knowledge spans (`documents.read_spans`, or a lexicon's entries found in each document
by the worker that encodes it, `documents.read_lexicon`), a document's sentences are cut
further at its spans' boundaries (`documents.cut_at_spans`), so spans too are exact token
ranges.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

import numpy as np

from data_pipeline.documents import (
    DocSpans,
    DocumentReader,
    Lexicon,
    cut_at_spans,
    split_sentences,
)
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
    doc_spans: np.ndarray  # int64 [docs]: its number of knowledge spans
    spans: np.ndarray  # int32 [sum(doc_spans), 3]: (start, end, kind code), relative to its doc


def _encode_chunk(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    first_index: int,
    dtype: np.dtype,
    spans: dict[int, DocSpans] | Lexicon | None = None,
) -> EncodedChunk:
    """Tokenise documents first_index, first_index + 1, ... sentence by sentence (cut at the
    boundaries of their `spans`, by input index, where given; a lexicon's are found in each
    document here)."""
    kept, pieces, piece_sentence, per_doc, span_pieces = [], [], [], [], []
    sentences = 0
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"document {first_index + k} is {type(text).__name__}, not str")
        if text.strip():
            parts = split_sentences(text)
            if isinstance(spans, Lexicon):
                entry = spans.doc_spans(first_index + k, text)
            else:
                entry = spans.get(first_index + k) if spans else None
            base = len(pieces)
            if entry:
                cut, sentence_of, doc_spans = cut_at_spans(text, parts, entry)
            else:
                cut, sentence_of, doc_spans = parts, range(len(parts)), []
            pieces += cut
            piece_sentence += [sentences + j for j in sentence_of]
            sentences += len(parts)
            span_pieces += [(len(kept), base + a, base + b, c) for a, b, c in doc_spans]
            kept.append(first_index + k)
            per_doc.append(len(parts))
    if not kept:
        empty = np.zeros(0, dtype=np.int64)
        return EncodedChunk(
            empty,
            empty,
            np.zeros(0, dtype),
            empty,
            empty.astype(np.int32),
            len(texts),
            empty,
            np.zeros((0, 3), dtype=np.int32),
        )
    ids, piece_lens = tokenizer.encode_concat(pieces)
    piece_lens = np.asarray(piece_lens, dtype=np.int64)
    lens = np.bincount(piece_sentence, weights=piece_lens).astype(np.int64)
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
    doc_spans, span_rows = _span_tokens(span_pieces, piece_lens, sent_begin[first_of_doc])
    return EncodedChunk(
        indices=np.asarray(kept, dtype=np.int64),
        doc_tokens=doc_tokens,
        tokens=tokens,
        doc_sentences=np.bincount(sent_doc[keep], minlength=len(kept)).astype(np.int64),
        sent_starts=starts[keep].astype(np.int32),
        skipped=len(texts) - len(kept),
        doc_spans=doc_spans,
        spans=span_rows,
    )


def _span_tokens(
    span_pieces: list[tuple[int, int, int, int]], piece_lens: np.ndarray, doc_begin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(spans per document, (start, end, kind) rows relative to their documents) of spans
    given as (document, first piece, last piece, kind); spans without tokens are dropped."""
    if not span_pieces:
        return np.zeros(len(doc_begin), dtype=np.int64), np.zeros((0, 3), dtype=np.int32)
    doc, first, last, kind = np.asarray(span_pieces, dtype=np.int64).T
    piece_end = np.cumsum(piece_lens)
    start = piece_end[first] - piece_lens[first] - doc_begin[doc]
    end = piece_end[last] - doc_begin[doc]
    keep = end > start
    rows = np.stack([start, end, kind], axis=1)[keep].astype(np.int32)
    return np.bincount(doc[keep], minlength=len(doc_begin)).astype(np.int64), rows


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


def _init_worker(tokenizer: Tokenizer, dtype: str, lexicon: Lexicon | None = None) -> None:
    _WORKER_STATE["tokenizer"], _WORKER_STATE["dtype"] = tokenizer, np.dtype(dtype)
    _WORKER_STATE["lexicon"] = lexicon  # sent once per worker, not with every chunk


def _encode_in_worker(texts: list[str], first_index: int, spans: dict | None) -> EncodedChunk:
    return _encode_chunk(
        _WORKER_STATE["tokenizer"],
        texts,
        first_index=first_index,
        dtype=_WORKER_STATE["dtype"],
        spans=_WORKER_STATE["lexicon"] or spans,
    )


def _chunk_spans(chunk: DocumentChunk, spans: dict[int, DocSpans] | Lexicon | None) -> dict | None:
    """The spans of the chunk's documents (a lexicon's are found by the worker)."""
    if not spans or isinstance(spans, Lexicon):
        return None
    indices = range(chunk.first_index, chunk.first_index + len(chunk.texts))
    return {i: spans[i] for i in indices if i in spans}


def encode_chunks(
    chunks: Iterator[DocumentChunk],
    tokenizer: Tokenizer,
    *,
    dtype: np.dtype,
    workers: int,
    spans: dict[int, DocSpans] | Lexicon | None = None,
) -> Iterator[tuple[DocumentChunk, EncodedChunk]]:
    """Each chunk with its encoding, in input order, encoded by `workers` processes; `spans`:
    knowledge spans by input document index (documents.read_spans) or a lexicon to find in
    every document (documents.read_lexicon)."""
    if workers == 1:
        for chunk in chunks:
            enc = _encode_chunk(
                tokenizer,
                chunk.texts,
                first_index=chunk.first_index,
                dtype=dtype,
                spans=spans if isinstance(spans, Lexicon) else _chunk_spans(chunk, spans),
            )
            yield chunk, enc
        return
    # spawn, not fork: the parent may hold threads (torch, the tokenizers thread pool) whose
    # locks a forked child would inherit in a held state. An executor rather than
    # multiprocessing.Pool, which silently replaces a worker that dies and then waits forever.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tokenizer, dtype.name, spans if isinstance(spans, Lexicon) else None),
    )
    pending: deque = deque()
    try:
        for chunk in chunks:  # submitted lazily: at most a few tasks per worker in memory
            future = pool.submit(
                _encode_in_worker, chunk.texts, chunk.first_index, _chunk_spans(chunk, spans)
            )
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
