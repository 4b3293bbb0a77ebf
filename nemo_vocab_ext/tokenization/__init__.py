"""Tokenizer files: loading (``load``), training, merging, the id check and FVT pieces, one module each."""
