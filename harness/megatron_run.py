"""Write a Megatron-LM run folder with megatron-core itself, on a CPU: a tiny ``GPTModel`` saved by
``dist_checkpointing.save`` into ``<out>/iter_<7 digits>/`` beside ``latest_checkpointed_iteration.txt``.

The saved dict is laid out as Megatron-LM's ``generate_state_dict`` lays it out: ``args`` (an
``argparse.Namespace``), ``checkpoint_version`` 3.0, ``iteration``, ``model`` (the model's sharded
state dict, keys without a prefix), ``rng_state`` (a ShardedObject per TP/PP rank) and
``num_floating_point_operations_so_far``. No optimizer state: megatron-core's optimizers allocate
on CUDA and accept only ``torch.cuda`` parameter types. Under ``torchrun --nproc_per_node=N``
(gloo) each rank saves its shard.

    python -m harness.megatron_run OUT --tp 1 --untied
    torchrun --nproc_per_node=2 -m harness.megatron_run OUT --tp 2 --tied
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.cpu_nemo import _patch_cuda_calls, init_cpu_process_group
from nemo_vocab_ext.core.sizes import padded_vocab_size
from nemo_vocab_ext.formats.megatron_run import TOKENIZER_DIR, TRACKER_FILE, iteration_folder_name

CHECKPOINT_VERSION = 3.0  # what Megatron-LM and Megatron-Bridge write


def run_args(options: argparse.Namespace) -> argparse.Namespace:
    """The ``args`` Megatron-LM pickles into ``common.pt``: the fields this project reads, plus a few
    of every other kind a real run holds (a torch dtype, a megatron enum, paths, lists)."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=options.layers,
        hidden_size=options.hidden,
        ffn_hidden_size=4 * options.hidden,
        num_attention_heads=options.heads,
        seq_length=options.seq_length,
        max_position_embeddings=options.seq_length,
        vocab_size=None,  # set only for tokenizers without files (NullTokenizer); the tokenizer sets the rest
        padded_vocab_size=padded_vocab_size(options.vocab_size, options.divisible_by, options.tp),
        make_vocab_size_divisible_by=options.divisible_by,
        tensor_model_parallel_size=options.tp,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        untie_embeddings_and_output_weights=not options.tied,
        tokenizer_type="GPT2BPETokenizer",
        tokenizer_model=None,
        vocab_file=options.vocab_file,
        merge_file=options.merge_file,
        params_dtype=torch.float32,
        attention_backend=AttnBackend.auto,
        ckpt_format="torch_dist",
        use_dist_ckpt=True,
        use_distributed_optimizer=False,
        no_save_optim=True,
        no_save_rng=False,
        data_path=["/data/corpus_text_document"],
        save=str(options.out),
        load=None,
        iteration=options.iteration,
        world_size=torch.distributed.get_world_size(),
    )


def build_model(options: argparse.Namespace) -> Any:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=options.layers,
        hidden_size=options.hidden,
        num_attention_heads=options.heads,
        tensor_model_parallel_size=options.tp,
        use_cpu_initialization=True,  # no CUDA RNG tracker: weights drawn on the CPU from torch's generator
    )
    return GPTModel(
        config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=padded_vocab_size(options.vocab_size, options.divisible_by, options.tp),
        max_sequence_length=options.seq_length,
        share_embeddings_and_output_weights=options.tied,
    )


def rng_state(tp: int) -> Any:
    """Megatron-LM's ``get_rng_state`` for torch_dist: one ShardedObject per (PP, TP) rank (no CUDA state here)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
    }
    return ShardedObject(
        "rng_state",
        [state],
        (1, tp),
        (0, parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def save_run(options: argparse.Namespace) -> Path:
    """Build the model, save iteration ``options.iteration`` into ``options.out``; the folder of that iteration."""
    from megatron.core import dist_checkpointing

    _patch_cuda_calls()  # the torch_dist writer synchronises and asks for the current CUDA device
    init_cpu_process_group(options.tp)
    torch.manual_seed(options.seed)
    model = build_model(options)
    state: dict[str, Any] = {
        "args": run_args(options),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": options.iteration,
        "model": model.sharded_state_dict(prefix=""),
        "rng_state": rng_state(options.tp),
        "num_floating_point_operations_so_far": 0,
    }
    folder = Path(options.out) / iteration_folder_name(options.iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, str(folder))
    torch.distributed.barrier()
    if rank == 0 and options.tokenizer is not None:
        (folder / TOKENIZER_DIR).mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(options.tokenizer / name, folder / TOKENIZER_DIR / name)
    if rank == 0:  # as Megatron-LM: the tracker is written last, once every rank has saved
        (Path(options.out) / TRACKER_FILE).write_text(str(options.iteration))
    return folder


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the run folder (created)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (= torchrun's process count)")
    tying = parser.add_mutually_exclusive_group()
    tying.add_argument("--tied", dest="tied", action="store_true", default=True)
    tying.add_argument("--untied", dest="tied", action="store_false")
    parser.add_argument("--iteration", type=int, default=10)
    parser.add_argument("--vocab-size", type=int, default=500, help="tokenizer size before padding")
    parser.add_argument("--divisible-by", type=int, default=128, help="make_vocab_size_divisible_by")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--vocab-file", default="/data/gpt2-vocab.json", help="recorded in args")
    parser.add_argument("--merge-file", default="/data/gpt2-merges.txt", help="recorded in args")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="a vocab.json + merges.txt folder copied into <iteration>/tokenizer/, as Megatron-LM saves its assets",
    )
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    folder = save_run(options)
    if torch.distributed.get_rank() == 0:
        print(folder)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
