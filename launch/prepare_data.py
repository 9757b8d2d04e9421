#!/usr/bin/env python
"""Turn text files into packed Arrow token shards plus manifest.json for training.

    python launch/prepare_data.py --input data/*.jsonl --output corpora/web \\
        --tokenizer bpe:32000 --seq-len 2048

Inputs: .txt (one document per file, or per line with --split-lines), .jsonl (the string field
--text-key of each line), .parquet (the string column --text-key), directories and globs.
--workers N tokenises in N processes (the output is the same for every N); a progress line goes
to stderr unless --quiet. Train with `data.path=corpora/web`. --val-fraction 0 holds no documents
out: the corpus has no validation split, and trains with `trainer.eval_every=0`. --spans FILE
stores knowledge spans (entities, phrases) beside the sentence starts for data.mlm.unit=knowledge.

A bad argument or input is reported as one line on stderr (exit code 2 for Loom's own error
types, 1 for a file that cannot be read, an existing output or unusable input text); set
LOOM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# These imports need the repo root on sys.path.
from common.errors import LoomError  # noqa: E402
from common.errors import report as report_error  # noqa: E402
from common.process import exit_after  # noqa: E402
from data_pipeline.corpus_format import TOKEN_DTYPES  # noqa: E402
from data_pipeline.documents import BAD_UTF8_POLICIES, read_documents  # noqa: E402
from data_pipeline.prepare import DEFAULT_ROWS_PER_BATCH, prepare_corpus  # noqa: E402

# Failures a user causes and fixes, reported as one line (any other exception is a bug).
ANTICIPATED = (LoomError, ValueError, TypeError, OSError, RuntimeError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenise documents and pack them into Arrow shards for Loom."
    )
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="byte | bpe:VOCAB | wordpiece:VOCAB | unigram:VOCAB | path/to/tokenizer.json "
        "| path/to/sentencepiece.model",
    )
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per training sample")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of documents held out for validation; 0: no validation split (%(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="seed of the train/val split (%(default)s)"
    )
    parser.add_argument(
        "--text-key", default="text", help="field of .jsonl / column of .parquet (%(default)s)"
    )
    parser.add_argument("--split-lines", action="store_true", help=".txt: one document per line")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument(
        "--rows-per-batch",
        type=int,
        default=DEFAULT_ROWS_PER_BATCH,
        help="rows per Arrow record batch (%(default)s)",
    )
    parser.add_argument(
        "--max-rows-per-shard",
        type=int,
        default=None,
        help="rows per shard file, a multiple of --rows-per-batch (default: ~256 MiB files)",
    )
    parser.add_argument(
        "--dtype",
        choices=TOKEN_DTYPES,
        default="auto",
        help="token id type; auto: the narrowest holding the vocabulary (%(default)s)",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (%(default)s)")
    parser.add_argument(
        "--on-bad-utf8",
        choices=BAD_UTF8_POLICIES,
        default="error",
        help="text that is not UTF-8: stop with an error, or skip and count the document "
        "(%(default)s)",
    )
    parser.add_argument(
        "--spans",
        default=None,
        help="knowledge spans for ERNIE knowledge masking: a JSONL of spans per input document, "
        '{"doc": index, "spans": [[start_char, end_char, "entity"|"phrase"], ...]}, or a '
        "lexicon, one KIND<TAB>TEXT line per entry (KIND entity or phrase), found in every "
        "document (longest first, never overlapping)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = prepare(args)
    except ANTICIPATED as err:
        return report_error(err, prog="prepare_data", code=2 if isinstance(err, LoomError) else 1)
    print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    report(manifest)
    return 0


def prepare(args: argparse.Namespace) -> dict:
    """Read the inputs and write the corpus; returns its manifest."""
    documents = read_documents(
        args.input,
        text_key=args.text_key,
        split_lines=args.split_lines,
        on_bad_utf8=args.on_bad_utf8,
    )
    return prepare_corpus(
        documents,
        args.output,
        tokenizer_spec=args.tokenizer,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        source_desc=" ".join(args.input),
        rows_per_batch=args.rows_per_batch,
        max_rows_per_shard=args.max_rows_per_shard,
        dtype=args.dtype,
        workers=args.workers,
        progress=None if args.quiet else sys.stderr,
        spans=args.spans,
    )


def report(manifest: dict) -> None:
    """The summary printed after a corpus is written."""
    tok = manifest["tokenizer"]
    print(f"  tokenizer {tok['kind']} (vocab {manifest['vocab_size']}), {manifest['dtype']} tokens")
    for name, split in manifest["splits"].items():
        print(
            f"  {name:5s}: {split['documents']:>10,} documents {split['tokens']:>14,} tokens "
            f"{split['rows']:>11,} rows of {manifest['sample_len']} "
            f"({len(split['shards'])} shards, {split['dropped_tokens']:,} tokens dropped)"
        )
    if "val" not in manifest["splits"]:
        print("  val  : none (--val-fraction 0); train with trainer.eval_every=0")
    print(
        f"  {manifest['documents']:,} documents, {manifest['sentences']:,} sentences "
        f"({manifest['sentence_splitter']} splitter)"
    )
    if "spans" in manifest:
        print(
            f"  {manifest['spans']['spans']:,} knowledge spans from {manifest['spans']['source']}"
        )
    if manifest["skipped_empty_documents"]:
        print(f"  skipped {manifest['skipped_empty_documents']:,} empty documents")
    for path, count in manifest["skipped_bad_utf8"].items():
        print(f"  skipped {count:,} documents that are not valid UTF-8 in {path}")


if __name__ == "__main__":
    exit_after(main)
