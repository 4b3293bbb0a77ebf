"""State-dict key names as data.

Keys are matched exactly after normalising the spellings NeMo produces (O2's ``model.module.``
and torch.compile's ``_orig_mod.``), never by substring: ``"word_embeddings" in key`` would also
catch unrelated tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Canonical names (after normalize_key) of the vocabulary-sized tensors, per model family.
MCORE = "mcore"
LEGACY = "legacy"
MEGATRON = "megatron"  # Megatron-LM / Megatron-Bridge run folders: megatron-core's keys, no "model." prefix

EMBEDDING_KEYS: dict[str, str] = {
    MCORE: "model.embedding.word_embeddings.weight",
    LEGACY: "model.language_model.embedding.word_embeddings.weight",
    MEGATRON: "embedding.word_embeddings.weight",
}
OUTPUT_LAYER_KEYS: dict[str, str] = {
    MCORE: "model.output_layer.weight",
    LEGACY: "model.language_model.output_layer.weight",
    MEGATRON: "output_layer.weight",
}
# Legacy pipeline-parallel models with tied weights keep a copy of the embedding on the last stage.
TIED_HEAD_COPY_KEYS: dict[str, tuple[str, ...]] = {
    MCORE: (),
    LEGACY: ("model.word_embeddings_for_head.weight", "model.word_embeddings.weight"),
    MEGATRON: (),
}

_O2_PREFIX = "model.module."
_COMPILE_SEGMENT = "_orig_mod."


def normalize_key(key: str) -> str:
    """Map every spelling of a key to its canonical form (``model.`` prefix, no wrappers)."""
    key = key.replace(_COMPILE_SEGMENT, "")
    if key.startswith(_O2_PREFIX):
        key = "model." + key[len(_O2_PREFIX) :]
    return key


class UnknownKeysError(ValueError):
    """No embedding table under any known key name."""

    def __init__(self, sample: list[str]):
        self.sample = sample
        expected = ", ".join(sorted(EMBEDDING_KEYS.values()))
        super().__init__(
            f"no word-embedding tensor found; expected one of {expected} "
            f"(O2 'model.module.' spellings accepted); first keys present: {', '.join(sample) or 'none'}"
        )


@dataclass(frozen=True)
class VocabKeys:
    """The stored spellings of the vocabulary-sized tensors of one checkpoint."""

    family: str
    embedding: str
    output_layer: str | None
    tied_copies: tuple[str, ...] = ()

    @property
    def tied(self) -> bool:
        return self.output_layer is None

    def all(self) -> tuple[str, ...]:
        """Every key whose rows follow the vocabulary, embedding first."""
        extra = (self.output_layer,) if self.output_layer else ()
        return (self.embedding, *extra, *self.tied_copies)


def find_vocab_keys(keys: Iterable[str]) -> VocabKeys:
    """Locate the embedding, the untied output layer and tied copies among stored ``keys``."""
    stored = list(keys)
    by_canonical = {normalize_key(k): k for k in stored}
    for family, embedding in EMBEDDING_KEYS.items():
        if embedding in by_canonical:
            output = by_canonical.get(OUTPUT_LAYER_KEYS[family])
            copies = tuple(by_canonical[k] for k in TIED_HEAD_COPY_KEYS[family] if k in by_canonical)
            return VocabKeys(family, by_canonical[embedding], output, copies)
    raise UnknownKeysError(sorted(stored)[:5])


# Hugging Face causal LMs: the vocabulary tables of each ``architectures`` entry of config.json, as
# transformers' modeling files name them (transformers 4.53), and whether the config class ties the
# output layer to the embedding when config.json has no ``tie_word_embeddings``.
@dataclass(frozen=True)
class HFArchitecture:
    embedding: str
    output_layer: str
    tied_by_default: bool


_DECODER = "model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"
HF_ARCHITECTURES: dict[str, HFArchitecture] = {
    "LlamaForCausalLM": HFArchitecture(_DECODER, _LM_HEAD, False),
    "MistralForCausalLM": HFArchitecture(_DECODER, _LM_HEAD, False),
    "Qwen2ForCausalLM": HFArchitecture(_DECODER, _LM_HEAD, False),
    "Qwen3ForCausalLM": HFArchitecture(_DECODER, _LM_HEAD, False),
    "NemotronForCausalLM": HFArchitecture(_DECODER, _LM_HEAD, False),
    "Phi3ForCausalLM": HFArchitecture(_DECODER, _LM_HEAD, False),
    "GemmaForCausalLM": HFArchitecture(_DECODER, _LM_HEAD, True),
    "GPT2LMHeadModel": HFArchitecture("transformer.wte.weight", _LM_HEAD, True),
}
HF = "hf"


class UnknownArchitectureError(ValueError):
    """config.json names no architecture whose vocabulary tables are known."""


def hf_vocab_keys(architectures: object, tie_word_embeddings: object, stored: Iterable[str]) -> VocabKeys:
    """The vocabulary tables of a Hugging Face model from its config.json's ``architectures`` and
    ``tie_word_embeddings`` (None: the architecture's default). A tied model's files usually lack the
    output layer; when they hold it anyway it is a copy of the embedding."""
    names = architectures if isinstance(architectures, list) else []
    known = [HF_ARCHITECTURES[n] for n in names if isinstance(n, str) and n in HF_ARCHITECTURES]
    if len(names) != 1 or not known:
        raise UnknownArchitectureError(
            f"config.json names the architecture {names or 'none'}; known: {', '.join(HF_ARCHITECTURES)}"
        )
    arch = known[0]
    tied = arch.tied_by_default if tie_word_embeddings is None else bool(tie_word_embeddings)
    present = set(stored)
    if arch.embedding not in present:
        raise UnknownArchitectureError(f"{names[0]} stores '{arch.embedding}', which the weights lack")
    if tied:
        copies = (arch.output_layer,) if arch.output_layer in present else ()
        return VocabKeys(HF, arch.embedding, None, copies)
    if arch.output_layer not in present:
        raise UnknownArchitectureError(
            f"tie_word_embeddings is false but the weights lack '{arch.output_layer}'; set it to true in config.json"
        )
    return VocabKeys(HF, arch.embedding, arch.output_layer)
