"""The base layer every Loom package may import: logging and the error types.

It imports no other Loom package, so `models/`, `data_pipeline/`, `parallel/` and
`trainer/` can all use it without breaking the layers of the architecture.
"""
