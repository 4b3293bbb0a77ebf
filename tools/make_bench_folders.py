"""Write the folder-shaped inputs of tools/bench.py: a Llama-shaped Hugging Face folder and a Megatron-LM run.

    python tools/make_bench_folders.py hf --size 1.3b --tokenizer TOK --out llama-hf
    python tools/make_bench_folders.py megatron --size 1.3b --tied --tokenizer TOK --out megatron-run

``hf``: ``config.json`` for ``LlamaForCausalLM`` (untied ``lm_head``, vocabulary = the tokenizer's),
random bf16 tensors under Hugging Face's key names in two safetensors shards with their index, written
shard by shard (no model is built, so memory stays at one shard), and the tokenizer's files.
``megatron``: ``harness.megatron_run`` (megatron-core itself) with the GPT shape of ``--size``.
Each is written beside its name and renamed once complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import checkout_root  # noqa: E402, F401 (the harness)
from make_checkpoint import SIZES  # noqa: E402

# (layers, hidden, intermediate, heads) of the Llama folder for each bench size: ~1B at "1.3b".
LLAMA_SHAPES = {"tiny": (2, 64, 176, 4), "1.3b": (16, 2048, 5632, 16)}
SHARDS = 2


def llama_tensors(layers: int, hidden: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of an untied ``LlamaForCausalLM`` (no grouped-query attention), in the order stored."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(f"{p}self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        out += [(f"{p}mlp.{n}_proj.weight", (intermediate, hidden)) for n in ("gate", "up")]
        out += [(f"{p}mlp.down_proj.weight", (hidden, intermediate))]
        out += [(f"{p}{n}.weight", (hidden,)) for n in ("input_layernorm", "post_attention_layernorm")]
    return [*out, ("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def write_hf_folder(size: str, tokenizer: Path, out: Path) -> None:
    layers, hidden, intermediate, heads = LLAMA_SHAPES[size]
    vocab = len(json.loads((tokenizer / "vocab.json").read_text()))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": vocab,
        "bos_token_id": vocab - 1,
        "eos_token_id": vocab - 1,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    specs = llama_tensors(layers, hidden, intermediate, vocab)
    per_shard = -(-len(specs) // SHARDS)
    weight_map: dict[str, str] = {}
    total = 0
    generator = torch.Generator().manual_seed(0)
    for s in range(SHARDS):
        name = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        shard = {
            key: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            for key, shape in specs[s * per_shard : (s + 1) * per_shard]
        }
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.nbytes for t in shard.values())
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer / f, tmp / f)
    tmp.rename(out)


def write_megatron_folder(size: str, tied: bool, tokenizer: Path, out: Path) -> None:
    from harness import megatron_run

    shape = SIZES[size]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    argv = [str(tmp), "--tied" if tied else "--untied", "--iteration", "1", "--vocab-size", str(shape.vocab)]
    argv += ["--divisible-by", str(shape.divisible_by), "--hidden", str(shape.hidden)]
    argv += ["--layers", str(shape.num_layers), "--heads", str(shape.heads), "--seq-length", str(shape.seq)]
    megatron_run.main([*argv, "--tokenizer", str(tokenizer)])
    tmp.rename(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("hf", "megatron"))
    p.add_argument("--size", choices=sorted(LLAMA_SHAPES), required=True)
    p.add_argument("--tied", action="store_true", help="megatron: share the embedding with the output layer")
    p.add_argument("--tokenizer", type=Path, required=True, help="a vocab.json + merges.txt folder")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.kind == "hf":
        write_hf_folder(args.size, args.tokenizer, args.out)
    else:
        write_megatron_folder(args.size, args.tied, args.tokenizer, args.out)


if __name__ == "__main__":
    main()
