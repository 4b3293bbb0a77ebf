"""The init-quality experiment's model side: tokenizers of two styles, tiny transformers models, a plain
torch training loop and held-out measurement, all on one CPU thread (``tools/quality.py`` runs it).

Two base styles, as users bring them:

* ``gpt2``: a GPT-2 byte-level BPE (``vocab.json`` + ``merges.txt``) and ``GPT2LMHeadModel`` (tied embeddings);
* ``llama``: a Llama 2 / Mistral style BPE in a ``tokenizer.json`` (``▁`` for spaces, ``<0xNN>`` byte
  fallback, ``<unk> <s> </s>`` first) and ``LlamaForCausalLM`` (untied output layer, RoPE, SwiGLU, RMSNorm).
"""

from __future__ import annotations

import hashlib
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.sentencepiece_style import SP_SPECIALS, sentencepiece_style
from nemo_vocab_ext.tokenization.load import EOS_TOKEN, TokenizerInfo
from nemo_vocab_ext.tokenization.train import train_bpe

STYLES = ("gpt2", "llama")
STYLE_LABELS = {
    "gpt2": "GPT-2 style (byte-level BPE, tied embeddings)",
    "llama": "Llama style (SentencePiece-style BPE with byte fallback, untied output layer, RoPE, SwiGLU, RMSNorm)",
}
EOS = {"gpt2": EOS_TOKEN, "llama": "</s>"}
SEQ = 128
BATCH = 16
LAYERS, HIDDEN, HEADS = 4, 128, 4
GPT2_FFN = 512
LLAMA_FFN = 344  # SwiGLU's three matrices at 344 hold about as many weights as GPT-2's two at 512
MODEL = {"layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "seq": SEQ, "batch": BATCH, "ffn": GPT2_FFN}


class LabError(RuntimeError):
    """The experiment cannot go on (a check failed); the message says which."""


# ------------------------------------------------------------------------------------------- tokenizers


def train_tokenizer(style: str, texts: Sequence[str], vocab_size: int, out: Path) -> Path:
    """A tokenizer of ``style`` trained on ``texts``: a vocab.json + merges.txt folder (gpt2) or a tokenizer.json."""
    if style == "gpt2":
        return train_bpe(texts, out, vocab_size)
    tk = sentencepiece_style(texts, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    return out / "tokenizer.json"


def tokenizer_files(tok: Path) -> list[Path]:
    """The files a model folder carries for this tokenizer."""
    return [tok] if tok.is_file() else [tok / "vocab.json", tok / "merges.txt"]


def token_byte_counts(tok: TokenizerInfo, style: str) -> np.ndarray:
    """Bytes of text each id stands for (0 for the end-of-document token): the denominator of bits per byte."""
    counts = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=np.int64)
    for special in (EOS[style], *SP_SPECIALS):
        i = tok.token_to_id(special)
        if i is not None:
            counts[i] = 0
    return counts


def token_stream(tok: TokenizerInfo, docs: Sequence[str], style: str) -> torch.Tensor:
    """The documents encoded back to back, each followed by the end-of-document token."""
    eod = tok.token_to_id(EOS[style])
    if eod is None:
        raise LabError(f"{tok.path}: no {EOS[style]} token")
    stream: list[int] = []
    for ids in tok.encode_batch(list(docs)):
        stream += [*ids, eod]
    return torch.tensor(stream, dtype=torch.long)


def chunks(stream: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping sequences of SEQ+1 tokens (all of them, or the first ``count``)."""
    n = len(stream) // (SEQ + 1)
    if count is not None:
        if n < count:
            raise LabError(f"held-out text gives {n} sequences of {SEQ + 1} tokens; {count} needed")
        n = count
    return stream[: n * (SEQ + 1)].view(n, SEQ + 1)


# ----------------------------------------------------------------------------------------------- models


def new_model(style: str, vocab_size: int, seed: int, eos_id: int) -> torch.nn.Module:
    """A freshly initialised tiny model of ``style`` (weights drawn from ``seed``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model: torch.nn.Module
    cfg: Any
    if style == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=SEQ,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=GPT2_FFN,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=LLAMA_FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=SEQ,
            bos_token_id=1,
            eos_token_id=eos_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    return model


def save_model(model: Any, tok: Path, folder: Path) -> None:
    """A Hugging Face model folder: config.json, model.safetensors and the tokenizer's files."""
    model.save_pretrained(str(folder), safe_serialization=True)
    for f in tokenizer_files(tok):
        shutil.copy2(f, folder / f.name)


def load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    model.eval()
    return model


# ------------------------------------------------------------------------------------------- training


def sample(stream: torch.Tensor, gen: torch.Generator, count: int) -> torch.Tensor:
    """``count`` windows of SEQ+1 tokens at random offsets."""
    starts = torch.randint(0, len(stream) - SEQ - 1, (count,), generator=gen)
    return torch.stack([stream[s : s + SEQ + 1] for s in starts.tolist()])


def train(
    model: Any,
    batch: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
    every: int = 0,
    callback: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW (no weight decay: rows of tokens absent from a batch stay as they are), 10% linear warm-up,
    cosine to a tenth of ``lr``, gradients clipped at 1; batches drawn from ``seed``; ``callback(step)``
    after every ``every`` steps and the last (the model in eval mode meanwhile). Returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    model.train()
    losses = []
    for _ in range(steps):
        x = batch(gen)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        done = len(losses)
        if callback is not None and (done == steps or (every and done % every == 0)):
            model.eval()
            callback(done)
            model.train()
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Measured:
    """Held-out loss of one model on one set of sequences."""

    nats: float  # mean negative log-likelihood per predicted token
    bpb: float  # the same loss in bits per byte of text predicted
    p_new: float  # mean probability the model gives ids at or above ``old_vocab``
    seq_nats: list[float]  # per sequence: its summed loss over its tokens, for paired intervals
    seq_bytes: list[int]
    digests: list[str]  # per sequence: a hash of its logits over the old ids (empty unless asked)


@torch.no_grad()
def measure(model: Any, seqs: torch.Tensor, byte_counts: np.ndarray, old_vocab: int, digests: bool = False) -> Measured:
    """Loss, bits per byte and probability on new ids over ``seqs``; with ``digests``, a SHA-256 of each
    sequence's float32 logits over ids below ``old_vocab`` (equal digests: bit-identical logits)."""
    nll_sum, bytes_sum, p_new, seq_nats, seq_bytes, hashes = 0.0, 0, 0.0, [], [], []
    counts = torch.from_numpy(byte_counts)
    for start in range(0, len(seqs), BATCH):
        x = seqs[start : start + BATCH]
        logits = model(input_ids=x[:, :-1]).logits.float()
        if digests:
            old = logits[..., :old_vocab].contiguous().numpy()
            hashes += [hashlib.sha256(old[i].tobytes()).hexdigest() for i in range(len(x))]
        norm = torch.logsumexp(logits, dim=-1)
        nll = (norm - logits.gather(-1, x[:, 1:, None]).squeeze(-1)).double()
        nb = counts[x[:, 1:]]
        seq_nats += nll.sum(1).tolist()
        seq_bytes += nb.sum(1).tolist()
        nll_sum += float(nll.sum())
        bytes_sum += int(nb.sum())
        if logits.shape[-1] > old_vocab:
            p_new += float((torch.logsumexp(logits[..., old_vocab:], dim=-1) - norm).exp().double().sum())
    tokens = seqs.shape[0] * SEQ
    return Measured(
        nats=nll_sum / tokens,
        bpb=nll_sum / max(1, bytes_sum) / math.log(2),
        p_new=p_new / tokens,
        seq_nats=seq_nats,
        seq_bytes=seq_bytes,
        digests=hashes,
    )


def set_output_rows(model: Any, old_vocab: int, how: str) -> None:
    """Untied models only: the output layer's new rows replaced (``mean`` of the old rows, or ``zeros``)."""
    head = model.get_output_embeddings().weight
    if head is model.get_input_embeddings().weight:
        raise LabError("the output layer is tied to the embedding; an output init needs an untied model")
    with torch.no_grad():
        head[old_vocab:] = head[:old_vocab].mean(0) if how == "mean" else 0.0
