"""Tokenizer files, one job a module: reading each kind (``load``), training (``train``), merging (``merge``),
the id check (``check``), fvt's pieces (``pieces``) and GPT-2's byte alphabet (``bytelevel``).

Pure files plus ``tokenizers``/``sentencepiece``: no NeMo import, so the CLI and the checks stay fast and work
without NeMo installed. (Named ``tokenization``, not ``tokenizers``: a folder of that name on ``sys.path``
would hide the Hugging Face library.)
"""
