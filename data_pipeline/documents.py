"""Reading input documents: text, JSONL and Parquet files, and cutting documents into sentences.

`read_documents` expands the inputs (files, directories, globs) into a fixed, sorted list of
files and returns a `DocumentReader` over them, which can be iterated any number of times (a
tokenizer that must be trained reads the corpus twice). Bad content is reported as it is reached,
naming the file and line or row. `split_sentences` is the fixed rule by which preparation cuts
documents into sentences; `SENTENCE_SPLITTER` names it in the manifest.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.errors import ConfigError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
BAD_UTF8_POLICIES = ("error", "skip")
# Names the rule of `split_sentences` in the manifest; bump when the rule changes.
SENTENCE_SPLITTER = "punct-newline-v1"


def read_documents(
    paths: str | Path | Sequence[str | Path],
    *,
    text_key: str = "text",
    split_lines: bool = False,
    on_bad_utf8: str = "error",
) -> DocumentReader:
    """Documents from text files, globs and directories, in a fixed order (see DocumentReader).

    Missing inputs are reported here, before any document is read.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = resolve_input_files(paths)
    return DocumentReader(
        files, text_key=text_key, split_lines=split_lines, on_bad_utf8=on_bad_utf8
    )


def resolve_input_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand globs and directories into the sorted list of input files."""
    if not paths:
        raise ConfigError("no input files given (--input)")
    files: list[Path] = []
    for raw in paths:
        text = str(raw)
        if glob.has_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise FileNotFoundError(f"input pattern {text!r} matches no files")
            candidates = [Path(m) for m in matches]
        else:
            candidates = [Path(text).expanduser()]
        for path in candidates:
            files.extend(_files_of(path, explicit=not glob.has_magic(text)))
    if not files:
        raise FileNotFoundError(
            f"no {'/'.join(SUPPORTED_SUFFIXES)} files found in {[str(p) for p in paths]}"
        )
    return files


def _files_of(path: Path, *, explicit: bool) -> list[Path]:
    if path.is_dir():
        found = (
            p
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and p.suffix in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        return list(found)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.suffix not in SUPPORTED_SUFFIXES:
        if not explicit:
            return []
        raise ValueError(
            f"input {path}: unsupported file type {path.suffix!r} "
            f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    return [path]


# A lone surrogate can come from a JSON "\ud800" escape; it has no UTF-8 encoding.
_SURROGATE = re.compile("[\ud800-\udfff]")


class DocumentReader:
    """The documents of a list of input files; iterable any number of times.

    - ``.txt``: the whole file is one document; with ``split_lines`` every non-blank line is one.
    - ``.jsonl``: one JSON object per line, the document is its string field ``text_key``.
    - ``.parquet``: the document is the string column ``text_key`` of each row.

    Bad content raises ValueError naming the file and line/row as it is reached. Text that is
    not valid UTF-8 is an error too, unless ``on_bad_utf8="skip"``: then the document (a whole
    .txt file without ``split_lines``, else the line or row) is left out and counted per file
    in `bad_utf8`. `bytes_read` of `total_bytes` tells how far the current pass has got.
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        text_key: str = "text",
        split_lines: bool = False,
        on_bad_utf8: str = "error",
    ) -> None:
        if on_bad_utf8 not in BAD_UTF8_POLICIES:
            raise ConfigError(
                f"on_bad_utf8 (--on-bad-utf8) = {on_bad_utf8!r} must be one of {BAD_UTF8_POLICIES}"
            )
        self.files = [Path(f) for f in files]
        self.text_key, self.split_lines, self.on_bad_utf8 = text_key, split_lines, on_bad_utf8
        self._sizes = [_file_size(f) for f in self.files]
        self.total_bytes = sum(self._sizes)
        self.bytes_read = 0
        self.bad_utf8: dict[str, int] = {}

    def __iter__(self) -> Iterator[str]:
        self.bytes_read = 0
        self.bad_utf8 = {}
        for path, size in zip(self.files, self._sizes, strict=True):
            start = self.bytes_read
            try:
                if path.suffix == ".txt" and not self.split_lines:
                    yield from self._read_txt(path)
                elif path.suffix == ".txt":
                    yield from self._read_lines(path)
                elif path.suffix == ".jsonl":
                    yield from self._read_jsonl(path)
                else:
                    yield from self._read_parquet(path, size)
            except OSError as err:
                raise OSError(f"input {path} cannot be read: {err.strerror or err}") from err
            self.bytes_read = start + size

    def _bad_utf8(self, where: str, path: Path) -> None:
        """Count a document that is not valid UTF-8, or raise (policy "error")."""
        if self.on_bad_utf8 == "error":
            raise ValueError(
                f"{where}: not valid UTF-8; pass on_bad_utf8='skip' (--on-bad-utf8 skip) "
                "to leave such documents out"
            )
        self.bad_utf8[str(path)] = self.bad_utf8.get(str(path), 0) + 1

    def _read_txt(self, path: Path) -> Iterator[str]:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            self._bad_utf8(f"{path}, line {line} (byte offset {err.start})", path)
            return
        yield text

    def _utf8_lines(self, path: Path) -> Iterator[tuple[int, bytes, str]]:
        """(line number, raw bytes, text) of every line that decodes; the others are
        reported (or skipped and counted) by the bad-UTF-8 policy."""
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                self.bytes_read += len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._bad_utf8(f"{path}, line {lineno}", path)
                    continue
                yield lineno, raw, line

    def _read_lines(self, path: Path) -> Iterator[str]:
        for _, _, line in self._utf8_lines(path):
            # splitlines also breaks at \r, \v, \f, \u2028...: one document per line of text
            yield from (part for part in line.splitlines() if part.strip())

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        for lineno, raw, line in self._utf8_lines(path):
            if not line.strip():
                continue
            text = _jsonl_text(line, self.text_key, where=f"{path}, line {lineno}")
            if b"\\u" in raw and _SURROGATE.search(text):
                self._bad_utf8(f"{path}, line {lineno} (a lone surrogate escape)", path)
                continue
            yield text

    def _read_parquet(self, path: Path, size: int) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
        column = _parquet_text_column(pf, path, self.text_key)
        binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        start, total_rows, row = self.bytes_read, max(pf.metadata.num_rows, 1), 0
        try:
            for batch in pf.iter_batches(columns=[self.text_key], batch_size=1024):
                # As bytes: pyarrow does not check UTF-8 when reading, and one bad value would
                # fail the whole batch's conversion without saying which row.
                for raw in batch.column(0).cast(binary).to_pylist():
                    if raw is None:
                        raise ValueError(f"{path}, row {row}: column {self.text_key!r} is null")
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self._bad_utf8(f"{path}, row {row}", path)
                    else:
                        yield text
                    row += 1
                self.bytes_read = start + size * row // total_rows
        except pa.ArrowException as err:
            raise ValueError(f"{path}, near row {row}: unreadable Parquet data ({err})") from None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise OSError(f"input {path} cannot be read: {err.strerror or err}") from err


def _jsonl_text(line: str, text_key: str, *, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        keys = ", ".join(map(repr, list(record)[:10]))
        raise ValueError(
            f"{where}: no field {text_key!r} (fields: {keys}); choose the field with --text-key"
        )
    text = record[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_key!r} is {type(text).__name__}, not a string")
    return text


def _parquet_text_column(pf, path: Path, text_key: str) -> pa.Field:
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise ValueError(
            f"{path}: no column {text_key!r} (columns: {schema.names}); choose one with --text-key"
        )
    field = schema.field(text_key)
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise ValueError(f"{path}: column {text_key!r} has type {field.type}, not string")
    return field


# ---------------------------------------------------------------------------------------------
# Knowledge spans

# Codes of the span kinds, as in the batches' span_kind (0: outside every span).
SPAN_CODES = {"phrase": 1, "entity": 2}
# One document's spans: where its record is ("FILE, line N", for errors), and its spans as
# (start char, end char, kind code), sorted and non-overlapping.
DocSpans = tuple[str, list[tuple[int, int, int]]]


def load_spans(path: str | Path) -> dict[int, DocSpans] | Lexicon:
    """The knowledge spans of `--spans FILE`: a JSONL file of per-document spans
    (`read_spans`) when its first non-blank line is a JSON object, else a lexicon
    (`read_lexicon`) whose entries are found in every document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spans file {path} (--spans) does not exist")
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    return read_spans(path) if first.lstrip().startswith("{") else read_lexicon(path)


def read_spans(path: str | Path) -> dict[int, DocSpans]:
    """The spans of a JSONL file of {"doc": input index, "spans": [[start_char, end_char,
    "entity" | "phrase"], ...]} records, by document. A bad record raises ValueError naming
    the file and line; whether a span fits its document is checked when it is encoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spans file {path} (--spans) does not exist")
    out: dict[int, DocSpans] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            doc, spans = _span_record(line, where=where)
            if doc in out:
                raise ValueError(f"{where}: document {doc} already has spans ({out[doc][0]})")
            out[doc] = (where, spans)
    return out


def _span_record(line: str, *, where: str) -> tuple[int, list[tuple[int, int, int]]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict) or set(record) != {"doc", "spans"}:
        raise ValueError(
            f'{where}: expected {{"doc": index, "spans": [...]}}, got {line.strip()[:80]}'
        )
    doc, items = record["doc"], record["spans"]
    if isinstance(doc, bool) or not isinstance(doc, int) or doc < 0:
        raise ValueError(f"{where}: doc={doc!r} must be a document index >= 0")
    if not isinstance(items, list):
        raise ValueError(f"{where}: spans must be a list of [start_char, end_char, kind]")
    spans = []
    for item in items:
        ok = isinstance(item, list) and len(item) == 3 and item[2] in SPAN_CODES
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in item[:2])
        if not ok or not 0 <= item[0] < item[1]:
            raise ValueError(
                f"{where}: span {item!r} is not [start_char, end_char, kind] with "
                f"0 <= start < end and kind one of {tuple(SPAN_CODES)}"
            )
        spans.append((item[0], item[1], SPAN_CODES[item[2]]))
    spans.sort()
    for (a, b, _), (c, d, _) in zip(spans[:-1], spans[1:], strict=True):
        if c < b:
            raise ValueError(f"{where}: spans [{a}, {b}) and [{c}, {d}) overlap")
    return doc, spans


class Lexicon:
    """Phrases and entities to find in every document: each occurrence becomes a span of its
    kind. At each place the longest entry wins, and the search goes on after it, so the
    spans never overlap (leftmost-longest). An entry that begins (ends) with an ASCII letter
    or digit must not have one just before (after) it, so "art" is not found in "party";
    other characters need no boundary, as in Chinese, which is written without spaces.
    Matching is case-sensitive."""

    def __init__(self, entries: dict[str, int], *, source: str):
        self.entries, self.source = entries, source
        alternatives = [
            (r"(?<![A-Za-z0-9])" if _ascii_alnum(text[0]) else "")
            + re.escape(text)
            + (r"(?![A-Za-z0-9])" if _ascii_alnum(text[-1]) else "")
            for text in sorted(entries, key=len, reverse=True)
        ]
        self._pattern = re.compile("|".join(alternatives)) if alternatives else None

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, text: str) -> list[tuple[int, int, int]]:
        """(start char, end char, kind code) of every entry found in `text`, in order."""
        if self._pattern is None:
            return []
        return [(m.start(), m.end(), self.entries[m.group()]) for m in self._pattern.finditer(text)]

    def doc_spans(self, index: int, text: str) -> DocSpans | None:
        """`find` as one document's entry of read_spans' table; None where nothing is found
        (a document without spans, as one that read_spans does not list)."""
        found = self.find(text)
        return (f"{self.source}, document {index}", found) if found else None


def _ascii_alnum(char: str) -> bool:
    return char.isascii() and char.isalnum()


def read_lexicon(path: str | Path) -> Lexicon:
    """A lexicon file: one entry a line, `KIND<TAB>TEXT` with KIND entity or phrase (blank
    lines and lines starting with # are skipped). A bad line, or a text listed under both
    kinds, raises ValueError naming the file and line."""
    path = Path(path)
    entries: dict[str, int] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            where = f"{path}, line {lineno}"
            kind, sep, text = line.partition("\t")
            if not sep or kind not in SPAN_CODES or not text.strip() or text != text.strip():
                raise ValueError(
                    f"{where}: expected KIND<TAB>TEXT with KIND one of {tuple(SPAN_CODES)} and "
                    f"TEXT without surrounding spaces, got {line[:80]!r}"
                )
            code = SPAN_CODES[kind]
            if entries.get(text, code) != code:
                raise ValueError(
                    f"{where}: {text!r} is listed as another kind on line {first_line[text]}"
                )
            entries[text] = code
            first_line.setdefault(text, lineno)
    return Lexicon(entries, source=str(path))


def cut_at_spans(
    text: str, sentences: list[str], entry: DocSpans
) -> tuple[list[str], list[int], list[tuple[int, int, int]]]:
    """(pieces, the sentence of each piece, spans as (first piece, last piece, kind code)):
    `sentences` of `text` cut further at its spans' ends, so that span boundaries are token
    boundaries. A span starts at the whitespace before it, as sentences do, so that byte-level
    BPE tokenises the cut text as the whole."""
    where, spans = entry
    n, prev_end, bounds = len(text), 0, []
    for start, end, code in spans:
        if end > n:
            raise ValueError(
                f"{where}: span [{start}, {end}) ends past the document's {n} characters"
            )
        while start > prev_end and text[start - 1].isspace():
            start -= 1
        bounds.append((start, end, code))
        prev_end = end
    sent_starts = np.cumsum([0, *(len(p) for p in sentences[:-1])])
    cuts = sorted({*sent_starts.tolist(), *(c for s, e, _ in bounds for c in (s, e) if c < n)})
    pieces = [text[a:b] for a, b in zip(cuts, [*cuts[1:], n], strict=True)]
    sentence_of = (np.searchsorted(sent_starts, cuts, side="right") - 1).tolist()
    first = np.searchsorted(cuts, [s for s, _, _ in bounds]).tolist()
    last = (np.searchsorted(cuts, [e for _, e, _ in bounds]) - 1).tolist()
    return (
        pieces,
        sentence_of,
        [(a, b, c) for a, b, (_, _, c) in zip(first, last, bounds, strict=True)],
    )


# ---------------------------------------------------------------------------------------------
# Sentences

# A sentence ends at . ! or ? (optionally followed by closing quotes or brackets) followed by
# whitespace, and at a line break. The whitespace between two sentences opens the second one:
# byte-level pre-tokenization never joins a non-space character to the space after it, so
# cutting there tokenises each sentence exactly as inside the whole document (and SentencePiece
# and WordPiece treat a leading space as a word boundary anyway). `(?<!\s)` lets only the first
# character of a whitespace run start the line-break match, which keeps the scan linear; the
# leading lookahead rejects most positions at once (about 40% faster).
_SENTENCE_BREAK = re.compile(r"(?=[.!?\s])(?:([.!?][\"')\]]*)\s+(?=\S)|(?<!\s)\s*\n\s*(?=\S))")


def split_sentences(text: str) -> list[str]:
    """`text` cut into sentences by a fixed rule; the pieces concatenate back to `text`.

    A sentence ends after end punctuation (. ! ?, optionally with closing quotes/brackets)
    followed by whitespace, and before any whitespace containing a newline (so a blank line
    too). The whitespace between two sentences starts the second; whitespace before the first
    non-space character stays in the first. Abbreviations ("e.g. this") also break: the rule is
    deliberately simple and deterministic, like the line-based input of BERT's data creation.
    """
    cuts = []
    for m in _SENTENCE_BREAK.finditer(text):
        cut = m.end(1) if m.group(1) is not None else m.start()
        if cut > 0:  # leading whitespace is not a sentence of its own
            cuts.append(cut)
    if not cuts:
        return [text]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
