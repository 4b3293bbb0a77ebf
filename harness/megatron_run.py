"""Write a Megatron-LM run folder with megatron-core itself, on a CPU: a tiny ``GPTModel`` saved by
``dist_checkpointing.save`` into ``<out>/iter_<7 digits>/`` beside ``latest_checkpointed_iteration.txt``.

The saved dict is laid out as Megatron-LM's ``generate_state_dict`` lays it out: ``args`` (an
``argparse.Namespace``), ``checkpoint_version`` 3.0, ``iteration``, ``model`` (the model's sharded
state dict, keys without a prefix), ``rng_state`` (a ShardedObject per TP/PP rank) and
``num_floating_point_operations_so_far``. No optimizer state: megatron-core's optimizers allocate
on CUDA and accept only ``torch.cuda`` parameter types. Under ``torchrun --nproc_per_node=N``
(gloo, N = TP x PP) each rank saves its shard. With pipeline parallelism each rank builds its
stage as Megatron-LM does: the embedding on the first stage, the output layer and final norm on
the last, the layers split between them; tied, the last stage holds a copy of the embedding
(all-reduced from the first at construction) that the checkpoint stores once.

    python -m harness.megatron_run OUT --tp 1 --untied
    torchrun --nproc_per_node=2 -m harness.megatron_run OUT --tp 2 --tied
    torchrun --nproc_per_node=2 -m harness.megatron_run OUT --pp 2 --untied

With ``--load CKPT --rows R``, a model built with ``R`` vocabulary rows loads the torch_dist folder
``CKPT`` with megatron-core's ``dist_checkpointing.load`` (strict ``load_state_dict``) and saves what
it loaded into ``OUT`` (a plain torch_dist folder: every tensor global, whatever the TP and PP), so
that a test can compare, tensor by tensor, what megatron-core read. The last stage's copy of a tied
table, a replica of the embedding in the checkpoint, is saved as ``output_layer.weight`` there, so
that what that stage loaded can be compared too:

    torchrun --nproc_per_node=2 -m harness.megatron_run OUT --tp 2 --tied --load RUN/iter_0000010 --rows 768
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from harness.cpu_nemo import _patch_cuda_calls, init_cpu_process_group
from nemo_vocab_ext.core.sizes import padded_vocab_size
from nemo_vocab_ext.formats.megatron_run import (
    BRIDGE_LATEST_TRAIN_STATE,
    BRIDGE_TRAIN_STATE,
    OUTPUT_LAYER_KEY,
    RUN_CONFIG,
    TOKENIZER_DIR,
    TRACKER_FILE,
    iteration_folder_name,
)
from nemo_vocab_ext.formats.torch_dist import COMMON_FILE

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
        padded_vocab_size=vocab_rows(options),
        make_vocab_size_divisible_by=options.divisible_by,
        tensor_model_parallel_size=options.tp,
        pipeline_model_parallel_size=options.pp,
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


def vocab_rows(options: argparse.Namespace) -> int:
    return options.rows or padded_vocab_size(options.vocab_size, options.divisible_by, options.tp)


def build_model(options: argparse.Namespace) -> Any:
    """This rank's stage of the GPT model (the whole model without pipeline parallelism)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=options.layers,
        hidden_size=options.hidden,
        num_attention_heads=options.heads,
        tensor_model_parallel_size=options.tp,
        pipeline_model_parallel_size=options.pp,
        pipeline_dtype=torch.float32,  # required with pipeline parallelism: what flows between the stages
        use_cpu_initialization=True,  # no CUDA RNG tracker: weights drawn on the CPU from torch's generator
    )
    return GPTModel(
        config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=vocab_rows(options),
        max_sequence_length=options.seq_length,
        share_embeddings_and_output_weights=options.tied,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def rng_state(tp: int, pp: int) -> Any:
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
        (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def optimizer_state(model_state: dict[str, Any]) -> dict[str, Any]:
    """Adam's moments keyed as megatron-core's model-space optimizer state keys them
    (``optimizer.state.exp_avg.<model key>``, sharded like the parameter), and the part common.pt keeps.
    Zeros: megatron-core's optimizers cannot be built on a CPU, only their checkpoint layout can."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    moments = {
        f"{moment}.{name}": dataclasses.replace(
            tensor, key=f"optimizer.state.{moment}.{tensor.key}", data=torch.zeros_like(tensor.data)
        )
        for name, tensor in model_state.items()
        if isinstance(tensor, ShardedTensor)
        for moment in ("exp_avg", "exp_avg_sq")
    }
    return {"state": moments, "param_state_sharding_type": "fully_sharded_model_space"}


def save_run(options: argparse.Namespace) -> Path:
    """Build the model, save iteration ``options.iteration`` into ``options.out``; the folder of that iteration."""
    from megatron.core import dist_checkpointing

    _patch_cuda_calls()  # the torch_dist writer synchronises and asks for the current CUDA device
    init_cpu_process_group(options.tp, options.pp)
    torch.manual_seed(options.seed)
    model = build_model(options)
    state: dict[str, Any] = {
        "args": run_args(options),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": options.iteration,
        "model": model.sharded_state_dict(prefix=""),
        "rng_state": rng_state(options.tp, options.pp),
        "num_floating_point_operations_so_far": 0,
    }
    if options.optimizer_state:
        state["optimizer"] = optimizer_state(state["model"])
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


def load_and_resave(options: argparse.Namespace) -> Path:
    """Load ``options.load`` into a model of ``options.rows`` rows as Megatron-LM does at start-up, then
    save the model's weights (only) into ``options.out``."""
    from megatron.core import dist_checkpointing

    _patch_cuda_calls()
    init_cpu_process_group(options.tp, options.pp)
    model = build_model(options)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict(prefix="")}, str(options.load))
    model.load_state_dict(loaded["model"], strict=True)  # every parameter, each of the right shape
    out = Path(options.out)
    if torch.distributed.get_rank() == 0:
        out.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": own_copies(model.sharded_state_dict(prefix=""))}, str(out))
    torch.distributed.barrier()
    return out


def own_copies(model_state: dict[str, Any]) -> dict[str, Any]:
    """``model_state`` with the last stage's copy of a tied table (the embedding's key, a replica) saved
    under its own key, ``output_layer.weight``, as the one stored copy of it."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    copy = model_state.get(OUTPUT_LAYER_KEY)
    if isinstance(copy, ShardedTensor) and copy.key != OUTPUT_LAYER_KEY:
        replica = (0, *copy.replica_id[1:]) if isinstance(copy.replica_id, tuple) else 0
        model_state = {
            **model_state,
            OUTPUT_LAYER_KEY: dataclasses.replace(copy, key=OUTPUT_LAYER_KEY, replica_id=replica),
        }
    return model_state


def as_bridge_run(
    run: Path, model: dict[str, Any], tokenizer: dict[str, Any], *, train_state: dict[str, Any] | None = None
) -> Path:
    """``run`` rewritten in place as Megatron-Bridge leaves it: ``common.pt`` without args, the model and
    tokenizer settings in ``run_config.yaml``; with ``train_state``, Bridge's train state in the iteration
    folder and beside the tracker."""
    folder = run / iteration_folder_name(int((run / TRACKER_FILE).read_text()))
    common = torch.load(folder / COMMON_FILE, weights_only=False)
    del common["args"]
    torch.save(common, folder / COMMON_FILE)
    (folder / RUN_CONFIG).write_text(yaml.safe_dump({"model": model, "tokenizer": tokenizer}))
    if train_state is not None:
        for path in (folder / BRIDGE_TRAIN_STATE, run / BRIDGE_LATEST_TRAIN_STATE):
            torch.save(train_state, path)
    return run


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the run folder (created)")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (torchrun's process count: TP x PP)")
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
    parser.add_argument("--optimizer-state", action="store_true", help="also save Adam's moments (zeros)")
    parser.add_argument("--load", type=Path, help="a torch_dist folder to load and save again into OUT")
    parser.add_argument("--rows", type=int, help="vocabulary rows of the model (default: the padded --vocab-size)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    folder = load_and_resave(options) if options.load else save_run(options)
    if torch.distributed.get_rank() == 0:
        print(folder)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
