"""Loom's data path: tokenizers, corpus preparation, packed-row reading and objectives."""
