"""The built-in sample corpus: real English text that ships with every CPython install.

It is the pydoc topic pages (``pydoc_data.topics``, about 465k characters) plus the docstrings of
a fixed list of standard-library modules (about 1.2 MB in all), so `python launch/train.py` can
train on something meaningful with no download.
"""

from __future__ import annotations

import ast
import functools
import gc
import hashlib
import json
import os
import platform
from pathlib import Path

from data_pipeline.corpus_format import MANIFEST_FILE
from data_pipeline.prepare import CorpusExistsError, prepare_corpus

# Bump when the document list, its formatting or the prepared format changes (2: shards gained
# sent_offsets, manifest schema_version 2), so cached corpora are rebuilt.
SAMPLE_CORPUS_VERSION = 2
SAMPLE_SEED = 1234

# Pure-Python modules whose docstrings are prose (read from source, never imported). Kept
# sorted; modules missing from an install (removed in a later Python) are skipped.
_DOC_MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.events", "asyncio.streams",
    "asyncio.tasks", "base64", "bisect", "bz2", "calendar", "cmd", "codecs", "collections",
    "collections.abc", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest", "email.message",
    "email.policy", "email.utils", "enum", "fractions", "ftplib", "functools", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "json", "locale", "logging", "logging.handlers", "lzma", "mailbox", "mimetypes",
    "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile",
    "pstats", "pydoc", "queue", "quopri", "random", "re", "reprlib", "runpy", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest.case", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "xml.sax.handler", "zipfile", "zoneinfo",
)  # fmt: skip


def sample_documents() -> list[str]:
    """The documents of the sample corpus, always in the same order.

    One document per pydoc topic (sorted by topic name), then one per module of `_DOC_MODULES`:
    its docstring followed by those of its public top-level classes (with their public methods)
    and functions, in source order, each under its qualified name. Docstrings are read from the
    source files rather than from imported objects, so the text does not depend on what else
    the process has imported or monkeypatched (torch, for one, replaces inspect.getfile).
    """
    return list(_cached_documents())


@functools.lru_cache(maxsize=1)
def _cached_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics) if topics[key].strip()]
    stdlib = Path(os.__file__).parent
    # Parsing makes millions of short-lived objects; with a large heap (torch imported) the
    # cyclic collector would otherwise take half the time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        texts = [_module_text(name, stdlib) for name in sorted(_DOC_MODULES)]
    finally:
        if gc_was_enabled:
            gc.enable()
    return tuple(docs + [text for text in texts if text])


def _module_source(name: str, stdlib: Path) -> str | None:
    base = stdlib.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None  # not in this install (removed in a later Python, or a C extension)


def _module_text(name: str, stdlib: Path) -> str:
    source = _module_source(name, stdlib)
    if source is None:
        return ""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    sections = []
    if doc := ast.get_docstring(tree):
        sections.append(f"Module {name}\n\n{doc}")
    for node in tree.body:
        if not isinstance(node, (ast.ClassDef, *_FUNCTIONS)) or node.name.startswith("_"):
            continue
        if isinstance(node, ast.ClassDef):
            if doc := ast.get_docstring(node):
                sections.append(f"class {name}.{node.name}\n\n{doc}")
            for item in node.body:
                public = isinstance(item, _FUNCTIONS) and not item.name.startswith("_")
                if public and (doc := ast.get_docstring(item)):
                    sections.append(f"{name}.{node.name}.{item.name}\n\n{doc}")
        elif isinstance(node, _FUNCTIONS) and (doc := ast.get_docstring(node)):
            sections.append(f"{name}.{node.name}\n\n{doc}")
    return "\n\n".join(sections)


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def default_cache_dir() -> Path:
    """$LOOM_CACHE, else ~/.cache/loom."""
    return Path(os.environ.get("LOOM_CACHE") or Path.home() / ".cache" / "loom").expanduser()


def sample_corpus_key(*, tokenizer_spec: str, seq_len: int, val_fraction: float) -> str:
    """Name of the prepared sample corpus for these settings (a content hash)."""
    spec = {
        "corpus_version": SAMPLE_CORPUS_VERSION,
        # docstrings change between Python releases
        "python": platform.python_version(),
        "tokenizer": tokenizer_spec,
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "seed": SAMPLE_SEED,
    }
    if tokenizer_spec.endswith((".json", ".model")) and Path(tokenizer_spec).is_file():
        spec["tokenizer_file_sha256"] = hashlib.sha256(
            Path(tokenizer_spec).read_bytes()
        ).hexdigest()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"sample-{digest}"


def ensure_sample_corpus(
    *, cache_dir: str | None, tokenizer_spec: str, seq_len: int, val_fraction: float
) -> Path:
    """Directory of the sample corpus prepared with these settings, preparing it on first use.

    Safe when several processes (e.g. every rank of a job) call it at once: each prepares into
    its own temporary directory and the first rename wins; the others discard theirs.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = sample_corpus_key(
        tokenizer_spec=tokenizer_spec, seq_len=seq_len, val_fraction=val_fraction
    )
    target = root / key
    if (target / MANIFEST_FILE).is_file():
        return target
    try:
        prepare_corpus(
            sample_documents(),
            target,
            tokenizer_spec=tokenizer_spec,
            seq_len=seq_len,
            val_fraction=val_fraction,
            seed=SAMPLE_SEED,
            source_desc=f"loom sample corpus v{SAMPLE_CORPUS_VERSION}",
        )
    except CorpusExistsError:
        if not (target / MANIFEST_FILE).is_file():
            raise
    return target
