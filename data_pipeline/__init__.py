"""Loom's data path: tokenizers, corpus preparation, packed-row reading and objectives.

Modules, lower layers first (each imports only modules above it in this list):

- ``corpus_format``, ``tokenizers``: the on-disk format (shard schema, manifest, checksums,
  `has_split`); tokenizers.
- ``config``: the `data` config group and its checks.
- ``documents``, ``encoding``, ``shard_writer``, ``prepare``: preparation (input files and
  sentences; chunked tokenisation in workers; packing rows into shards; the driver).
  ``sample_corpus``: the built-in corpus.
- ``rows``, ``dataset``, ``micro_batch``, ``blend``, ``loader``: reading (mapped shard views;
  one split of a corpus; micro-batch planning; weighted blends; the DP-sharded loader).
- ``objectives``: batch transforms from packed rows to model inputs and labels.
"""
