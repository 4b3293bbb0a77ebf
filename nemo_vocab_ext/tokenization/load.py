"""Reading tokenizer files (GPT-2 ``vocab.json`` + ``merges.txt``, a Hugging Face ``tokenizer.json``, a
SentencePiece ``.model``) into a :class:`TokenizerInfo`, and their sizes as NeMo defines them.

Where NeMo's behaviour matters (the vocab size, what its GPT2BPETokenizer does with ``merges.txt``) it is
reproduced here, without importing NeMo, and pinned by a test against NeMo itself.

Vocab size as NeMo counts it (NeMo 2.4.1):

* ``get_nmt_tokenizer(library='megatron', model_name='GPT2BPETokenizer', vocab_file, merges_file)`` builds
  NeMo's ``AutoTokenizer`` around transformers' *slow* ``GPT2Tokenizer`` and reports ``len(hf_tokenizer)``:
  the number of distinct token strings in ``vocab.json`` plus added tokens. ``<|endoftext|>`` is the slow
  tokenizer's unk/bos/eos, so when ``vocab.json`` lacks it, it is added with id ``len(vocab.json)`` and
  the size is one more than the file's entry count.
* ``tokenizer.json`` (HF fast tokenizer): ``len(tokenizer)`` = ``get_vocab_size(with_added_tokens=True)``.
* SentencePiece: ``get_piece_size()`` (special tokens are added on top only in NeMo's legacy mode).
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from nemo_vocab_ext.errors import TokenizerError
from nemo_vocab_ext.tokenization.bytelevel import byte_level_bytes, split_utf8, to_byte_level

EOS_TOKEN = "<|endoftext|>"

KIND_GPT2_BPE = "gpt2-bpe"  # folder with vocab.json + merges.txt, what NeMo's GPT2BPETokenizer reads
KIND_TOKENIZER_JSON = "tokenizer.json"  # HF fast tokenizer file
KIND_SENTENCEPIECE = "sentencepiece"  # SentencePiece .model

MERGES_HEADER = "#version: 0.2"
_MERGE_LINES = re.compile(r"(?:\S+ \S+\n)*")  # merges.txt after its header, when every line is well formed
_SP_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SP_SPACE = "\u2581"  # SentencePiece's visible space "▁"

_LOAD_HINT = "pass a folder with vocab.json + merges.txt, a tokenizer.json or a SentencePiece .model"


def read_vocab_json(path: str | Path) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        vocab: dict[str, int] = json.load(f)
    return vocab


class TokenizerInfo:
    """A tokenizer as NeMo sees it: ids, size, merges, encoding, and the files to embed as artifacts.

    ``tokens[i]`` is the token string of id ``i`` as stored (byte-level strings for GPT-2 BPE, pieces for
    SentencePiece), including tokens NeMo adds on load (``nemo_added``). ``vocab_size == len(tokens)``.
    """

    def __init__(
        self,
        *,
        kind: str,
        path: Path,
        files: tuple[Path, ...],
        tokens: list[str],
        merges: list[tuple[str, str]],
        byte_level: bool,
        nemo_added: tuple[str, ...] = (),
        special_tokens: frozenset[str] = frozenset(),
        backend: Callable[[], Any],
    ) -> None:
        self.kind = kind
        self.path = path
        self.files = files
        self.tokens = tokens
        self.merges = merges
        self.byte_level = byte_level
        self.nemo_added = nemo_added
        self.special_tokens = special_tokens
        self._make_backend = backend
        self._backend: Any = None
        self._raw_sp: Any = None
        self._ids: dict[str, int] | None = None

    def __repr__(self) -> str:
        return f"TokenizerInfo(kind={self.kind!r}, path='{self.path}', vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """The size NeMo reports (``tokenizer.vocab_size``), the ``V`` of the padded-size formula."""
        return len(self.tokens)

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    def token_to_id(self, token: str) -> int | None:
        if self._ids is None:
            self._ids = {t: i for i, t in enumerate(self.tokens)}
        return self._ids.get(token)

    @property
    def backend(self) -> Any:
        if self._backend is None:
            self._backend = self._make_backend()
        return self._backend

    def encode(self, text: str) -> list[int]:
        """Ids for ``text`` without BOS/EOS, as NeMo's ``text_to_ids`` gives them."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == KIND_SENTENCEPIECE:
            ids: list[list[int]] = self.backend.encode(list(texts))
            return ids
        # The _fast variant skips the offsets, which are not used (ids as encode_batch gives them).
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def token_bytes(self, i: int) -> bytes:
        """The raw bytes token ``i`` stands for (a byte-level token may hold part of a UTF-8 character)."""
        token = self.tokens[i]
        if self.kind == KIND_SENTENCEPIECE:
            sp = self.backend
            if sp.is_control(i) or sp.is_unknown(i):
                return b""
            if sp.is_byte(i):
                m = _SP_BYTE_PIECE.match(token)
                return bytes([int(m.group(1), 16)]) if m else b""
            return token.replace(SP_SPACE, " ").encode("utf-8")
        if self.byte_level and token not in self.special_tokens:
            raw = byte_level_bytes(token)
            if raw is not None:
                return raw
        m = _SP_BYTE_PIECE.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace(SP_SPACE, " ").encode("utf-8")

    def encode_bytes(self, data: bytes) -> list[int]:
        """This tokenizer's ids for a byte string: the text encoded normally, or, where the bytes are not
        whole UTF-8 characters, the BPE model run on them directly (byte level) or byte pieces (SP)."""
        if not data:
            return []
        parts = split_utf8(data)
        if self.byte_level and any(isinstance(p, int) for p in parts):
            # Part of a character: no text to encode, but byte-level BPE works on bytes anyway.
            return [t.id for t in self.backend.model.tokenize(to_byte_level(data))]
        ids: list[int] = []
        for part in parts:
            if isinstance(part, str):
                ids.extend(self._encode_fragment(part))
                continue
            byte_id = self.token_to_id(f"<0x{part:02X}>")
            if byte_id is not None:
                ids.append(byte_id)
            elif self.kind == KIND_SENTENCEPIECE:
                ids.append(self.backend.unk_id())
        return ids

    def encode_bytes_batch(self, items: Sequence[bytes]) -> list[list[int]]:
        """:meth:`encode_bytes` of each item; whole UTF-8 texts under a BPE go to the backend in one batch
        (7000 one-text calls cost a resize about 0.2 s)."""
        texts: dict[int, str] = {}
        if self.kind != KIND_SENTENCEPIECE:
            for i, data in enumerate(items):
                try:
                    texts[i] = data.decode("utf-8")
                except UnicodeDecodeError:
                    continue
        batched = dict(zip(texts, self.encode_batch(list(texts.values())) if texts else [], strict=True))
        return [batched[i] if i in batched and data else self.encode_bytes(data) for i, data in enumerate(items)]

    def _encode_fragment(self, text: str) -> list[int]:
        if self.kind != KIND_SENTENCEPIECE:
            return self.encode(text)
        # A piece is a fragment of a word: SentencePiece's usual dummy "▁" prefix and whitespace cleanup
        # would turn "ing" into "▁ing", so encode with a copy whose normalizer leaves the text alone.
        if self._raw_sp is None:
            self._raw_sp = _raw_sentencepiece(self.path)
        ids: list[int] = self._raw_sp.encode(text)
        return ids


def load_tokenizer(path: str | Path) -> TokenizerInfo:
    """Read a tokenizer: a folder with ``vocab.json`` + ``merges.txt`` (GPT-2 BPE, preferred when a
    folder has several), a ``tokenizer.json`` (file or folder) or a SentencePiece ``.model`` (file, or the
    only ``.model`` in a folder)."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"{p}: no such file or folder; {_LOAD_HINT}")
    if p.is_dir():
        vocab, merges = p / "vocab.json", p / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return _load_gpt2_bpe(vocab, merges)
        if (p / "tokenizer.json").is_file():
            return _load_tokenizer_json(p / "tokenizer.json")
        models = sorted(p.glob("*.model"))
        if len(models) == 1:
            return _load_sentencepiece(models[0])
        if vocab.is_file() or merges.is_file():
            missing = "merges.txt" if vocab.is_file() else "vocab.json"
            raise TokenizerError(f"{p}: has no {missing}; GPT-2 BPE needs both vocab.json and merges.txt")
        if len(models) > 1:
            raise TokenizerError(f"{p}: holds {len(models)} .model files; pass the SentencePiece model file itself")
        raise TokenizerError(f"{p}: no tokenizer files found; {_LOAD_HINT}")
    if p.suffix == ".model":
        return _load_sentencepiece(p)
    if p.name in ("vocab.json", "merges.txt"):
        return load_tokenizer(p.parent)
    if p.suffix == ".json":
        return _load_tokenizer_json(p)
    raise TokenizerError(f"{p}: not a tokenizer file this tool reads; {_LOAD_HINT}")


def _require_mapping(vocab: Any, path: Path) -> dict[str, Any]:
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: expected a JSON object mapping tokens to ids")
    return vocab


def _tokens_from_vocab(vocab: Any, path: Path) -> list[str]:
    n = len(_require_mapping(vocab, path))
    # Whole-dict checks first: integer ids that are exactly 0..n-1 (a resize reads two 50k-token
    # vocabularies); the loop below only runs to name the first bad entry.
    if set(map(type, vocab.values())) <= {int}:
        by_id = dict(zip(vocab.values(), vocab.keys(), strict=True))
        if len(by_id) == n and (n == 0 or (min(by_id) == 0 and max(by_id) == n - 1)):
            return [by_id[i] for i in range(n)]
    tokens: list[str | None] = [None] * n
    for tok, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise TokenizerError(f"{path}: token {tok!r} has id {i!r}, not an integer")
        # NeMo sizes the table by the token count, so an id >= count would index past the embedding.
        if not 0 <= i < n:
            raise TokenizerError(
                f"{path}: token {tok!r} has id {i} but there are {n} tokens; ids must be 0..{n - 1} without gaps"
            )
        if tokens[i] is not None:
            raise TokenizerError(f"{path}: tokens {tokens[i]!r} and {tok!r} share id {i}; every id needs one token")
        tokens[i] = tok
    return [t for t in tokens if t is not None]


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """Parse merges.txt the way NeMo's GPT2BPETokenizer (transformers' slow GPT2Tokenizer) does, and
    refuse the files it would silently misread: it always drops the first and the last line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e})") from None
    if not text:
        return []
    header, _, body = text.partition("\n")
    if not header.startswith("#version"):
        raise TokenizerError(
            f"{path}: line 1 is {header!r}, not a '#version' header; NeMo's GPT2BPETokenizer skips line 1 "
            f"and would lose that merge; add '{MERGES_HEADER}' as the first line"
        )
    last = text[text.rfind("\n") + 1 :]
    if "\n" in text and last.strip():
        raise TokenizerError(
            f"{path}: does not end with a newline; NeMo's GPT2BPETokenizer would drop the last merge "
            f"{last!r}; add a final newline"
        )
    # Whole-file checks first (a resize reads two 50k-line files beside its copy): when every line
    # is two tokens and a space, the words pair up. The line-by-line pass below only runs to name
    # the first bad line.
    if _MERGE_LINES.fullmatch(body):
        words = body.split()
        merges = list(zip(words[0::2], words[1::2], strict=True))
        if len(set(merges)) == len(merges):
            return merges
    merges = []
    seen: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(body.split("\n"), 2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{lineno}: expected two tokens separated by a space, got {line!r}")
        pair = (parts[0], parts[1])
        if pair in seen:
            raise TokenizerError(f"{path}:{lineno}: merge {line!r} repeats line {seen[pair]}; remove the duplicate")
        seen[pair] = lineno
        merges.append(pair)
    return merges


def _check_merges_in_vocab(merges: list[tuple[str, str]], tokens: Iterable[str], where: Path) -> None:
    vocab = set(tokens)
    if vocab.issuperset(itertools.chain.from_iterable(merges)) and vocab.issuperset(
        itertools.starmap(operator.concat, merges)
    ):
        return
    for rank, (a, b) in enumerate(merges):
        for needed in (a, b, a + b):
            if needed not in vocab:
                raise TokenizerError(
                    f"{where}: merge {rank} {a!r} {b!r} needs token {needed!r}, which is not in the vocabulary"
                )


def _read_gpt2_vocab(vocab_path: Path) -> dict[str, int]:
    """vocab.json's mapping, shared by every reader of the same unchanged file: callers must not modify
    it. A resize counts both vocabularies before it plans, then reads them whole on a thread beside the
    copy, which finds them parsed (50k entries: about 40 ms each)."""
    try:
        st = vocab_path.stat()
        return _parsed_vocab(vocab_path.resolve(), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{vocab_path}: cannot read ({e}); expected GPT-2 vocab.json") from None


@lru_cache(maxsize=4)
def _parsed_vocab(vocab_path: Path, _version: tuple[int, ...]) -> dict[str, int]:
    return _require_mapping(read_vocab_json(vocab_path), vocab_path)


def tokenizer_size(path: str | Path) -> int:
    """The size :func:`load_tokenizer` reports, from the vocabulary alone where it can (a GPT-2 BPE
    folder's vocab.json; merges.txt is read and checked only by the full load)."""
    p = Path(path)
    folder = p.parent if p.name in ("vocab.json", "merges.txt") else p
    if folder.is_dir() and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        # The count alone: the full load checks the ids (and raises) before anything is published.
        vocab = _read_gpt2_vocab(folder / "vocab.json")
        return len(vocab) + (EOS_TOKEN not in vocab)  # NeMo adds the end-of-text token when missing
    return load_tokenizer(p).vocab_size


def _load_gpt2_bpe(vocab_path: Path, merges_path: Path) -> TokenizerInfo:
    vocab = _read_gpt2_vocab(vocab_path)
    tokens = _tokens_from_vocab(vocab, vocab_path)
    merges = _read_merges_txt(merges_path)
    _check_merges_in_vocab(merges, tokens, merges_path)
    nemo_added: tuple[str, ...] = ()
    if EOS_TOKEN not in vocab:
        # GPT2Tokenizer's unk/bos/eos: NeMo's AutoTokenizer adds it with id len(vocab.json).
        tokens.append(EOS_TOKEN)
        nemo_added = (EOS_TOKEN,)

    def backend() -> Any:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tk = Tokenizer(models.BPE(vocab, merges))  # the file's own tokens (without nemo_added)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        # NeMo's slow GPT2Tokenizer matches <|endoftext|> in text as one special token; do the same.
        tk.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
        return tk

    return TokenizerInfo(
        kind=KIND_GPT2_BPE,
        path=vocab_path.parent,
        files=(vocab_path, merges_path),
        tokens=tokens,
        merges=merges,
        byte_level=True,
        nemo_added=nemo_added,
        special_tokens=frozenset({EOS_TOKEN}),
        backend=backend,
    )


def has_type(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == name or any(has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(has_type(v, name) for v in node)
    return False


def merge_pairs(model: dict[str, Any], path: Path) -> list[tuple[str, str]]:
    """A tokenizer.json BPE model's merges in rank order."""
    merges: list[tuple[str, str]] = []
    for m in model.get("merges") or []:  # tokenizers >= 0.20 writes [a, b]; older files "a b"
        pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        if len(pair) != 2:
            raise TokenizerError(f"{path}: malformed merge {m!r}")
        merges.append((str(pair[0]), str(pair[1])))
    return merges


def _load_tokenizer_json(path: Path) -> TokenizerInfo:
    from tokenizers import Tokenizer

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tk = Tokenizer.from_file(str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read ({e}); expected a HF tokenizer.json") from None
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
    vocab = tk.get_vocab(with_added_tokens=True)
    tokens = _tokens_from_vocab(vocab, path)
    if len(tokens) != tk.get_vocab_size(with_added_tokens=True):
        size = tk.get_vocab_size(with_added_tokens=True)
        raise TokenizerError(f"{path}: {len(tokens)} distinct tokens but size {size}; cannot map ids to tokens")
    merges = merge_pairs(data.get("model") or {}, path)
    special = frozenset(t["content"] for t in data.get("added_tokens") or [] if t.get("special"))
    byte_level = has_type(data.get("pre_tokenizer"), "ByteLevel") or has_type(data.get("decoder"), "ByteLevel")
    return TokenizerInfo(
        kind=KIND_TOKENIZER_JSON,
        path=path,
        files=(path,),
        tokens=tokens,
        merges=merges,
        byte_level=byte_level,
        special_tokens=special,
        backend=lambda: tk,
    )


def _load_sentencepiece(path: Path) -> TokenizerInfo:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    # Pieces are unique in a valid model, but check: every later lookup assumes one id per piece.
    if len(set(tokens)) != len(tokens):
        raise TokenizerError(f"{path}: a piece appears twice; the model is corrupt")
    return TokenizerInfo(
        kind=KIND_SENTENCEPIECE,
        path=path,
        files=(path,),
        tokens=tokens,
        merges=[],
        byte_level=False,
        backend=lambda: sp,
    )


def load_sp_proto(path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # protobuf's DecodeError
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    return proto


def _raw_sentencepiece(path: Path) -> Any:
    import sentencepiece as spm

    proto = load_sp_proto(path)
    spec = proto.normalizer_spec
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
