"""Patches that let NeMo 2.4.1 + megatron-core 0.13.1 run outside NVIDIA's container: no apex, no TE, maybe no GPU.

Used by the tests and the demo only; the plugin never imports this module. Each patch was found
from a real failure of building, saving, restoring, training, checkpointing or resuming a tiny
Megatron GPT on a CPU-only machine (at TP=1 and under torchrun at TP=2). On a GPU machine only the
stand-ins for a missing apex and Transformer Engine are applied, and nothing at all when apex is
installed (NeMo's container). Call :func:`apply_cpu_patches`, then :func:`init_cpu_process_group`,
before the first model is built.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

_applied = False


def apply_cpu_patches() -> None:
    """Patch NeMo and megatron-core in place. Idempotent; a no-op on a GPU machine with apex."""
    global _applied
    gpu = torch.cuda.is_available()
    if _applied or (gpu and _have_apex()):
        return
    _applied = True  # set first: a second call must never wrap the wrappers
    # NeMo runs re.fullmatch on it when enabling NVIDIA optimisations; it is unset outside NVIDIA containers.
    os.environ.setdefault("NVIDIA_PYTORCH_VERSION", "24.12")
    # Missing apex and Transformer Engine, GPU or not.
    _patch_nlp_overrides()
    _patch_gpt_specs()
    _patch_build_model()
    _patch_megatron_utils()
    if not gpu:
        _patch_cuda_calls()
        _patch_base_model()
        _patch_schedules()
        _patch_rng_tracker()


def _have_apex() -> bool:
    import importlib.util

    return importlib.util.find_spec("apex") is not None


def init_cpu_process_group(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Set up torch.distributed (gloo; NCCL on a GPU) and megatron's parallel state before a model is built.

    megatron-core reads process groups while it builds the model, but NeMo only sets them up in
    ``fit()``; with a group already there, Lightning and NeMo skip their own initialisation.
    Under torchrun (``RANK`` and ``WORLD_SIZE`` set) the group comes from its environment: a
    1-rank group per process would make every rank build the whole table, while the log still
    claims tensor parallelism, and fail only at save.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    model_parallel = tensor_parallel * pipeline_parallel
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, init_method="env://")
        elif model_parallel != 1:
            raise ValueError(f"model parallel size {model_parallel} needs torchrun with that many processes")
        else:
            # gloo deletes the store file once every rank has let go of it.
            fd, store = tempfile.mkstemp(prefix="gloo_store_")
            os.close(fd)
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if dist.get_world_size() % model_parallel:
        raise ValueError(
            f"world size {dist.get_world_size()} is not a multiple of the model parallel size {model_parallel}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _tensor_stays(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _patch_cuda_calls() -> None:
    # Unconditional CUDA calls on the paths above, which have nothing to do on a CPU.
    torch.cuda.synchronize = _noop  # megatron's checkpoint writer syncs before copying tensors
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment,return-value]  # device= of megatron's async save
    torch.Tensor.cuda = _tensor_stays  # type: ignore[method-assign,assignment]  # NeMo's parameter count before fit()


def _patch_nlp_overrides() -> None:
    from nemo.collections.nlp.parts import nlp_overrides

    # NLPDDPStrategy refuses to construct without apex, which nothing on this path uses.
    nlp_overrides.HAVE_APEX = True
    # Imported from apex-only modules, then named in isinstance checks when a training checkpoint
    # saves optimizer state (NameError): stand-ins that nothing is an instance of.
    for name in ("McoreDistributedOptimizer", "MegatronDistributedFusedAdam"):
        if not hasattr(nlp_overrides, name):
            setattr(nlp_overrides, name, type(name, (), {}))
    _patch_optimizer_step_sharding(nlp_overrides)


def _patch_optimizer_step_sharding(nlp_overrides: Any) -> None:
    """Save and resume torch's Adam/AdamW state in distributed training checkpoints.

    torch keeps ``state['step']`` per parameter as a 0-dim tensor, and NeMo hands every
    per-parameter entry to megatron-core, which asserts each has the parameter's shape
    ("Optimizer shape (() does not match model shape"). NeMo's path was written for apex
    FusedAdam, which keeps the step in param_groups, so this hits any run without apex. Done as
    megatron-core's own FP32Optimizer does it: the step is stored once as ``state['common_step']``
    and put back on every parameter before loading (else ``KeyError: 'step'`` on resume).
    """
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    stock_to_sharding = nlp_overrides.optim_state_to_sharding_state

    def optim_state_to_sharding_state(
        optim_state_dict: dict[str, Any], id_to_sharded_param_map: dict[int, Any], exclude_keys: tuple[str, ...] = ()
    ) -> None:
        # Serves both of NeMo's callers: plain torch optimizers and MainParamsOptimizerWrapper's inner dict.
        # The stock function builds new per-parameter dicts, so the live optimizer keeps its steps.
        step = MegatronOptimizer._extract_common_per_param_step(optim_state_dict)
        stock_to_sharding(optim_state_dict, id_to_sharded_param_map, exclude_keys=(*exclude_keys, "step"))
        if step is not None:
            optim_state_dict["state"]["common_step"] = step

    nlp_overrides.optim_state_to_sharding_state = optim_state_to_sharding_state

    strategy = nlp_overrides.NLPDDPStrategy
    stock_load = strategy.load_optimizer_state_dict

    def load_optimizer_state_dict(self: Any, checkpoint: dict[str, Any]) -> None:
        for opt_state in checkpoint.get("optimizer_states") or []:
            inner = opt_state.get("optimizer", opt_state)  # MainParamsOptimizerWrapper nests torch's dict
            step = inner.get("state", {}).pop("common_step", None)
            if step is not None:
                MegatronOptimizer._restore_common_per_param_step(inner, step)
        stock_load(self, checkpoint)

    strategy.load_optimizer_state_dict = load_optimizer_state_dict


def _patch_gpt_specs() -> None:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from nemo.collections.nlp.models.language_modeling import megatron_gpt_model

    stock_get_specs = megatron_gpt_model.get_specs

    def get_specs(
        spec_name: str, transformer_config: Any = None, use_te: bool = True, *args: Any, **kwargs: Any
    ) -> Any:
        # The stock one builds every spec eagerly, Transformer Engine ones included (NameError: TESpecProvider).
        if spec_name == "" and not use_te:
            experts = transformer_config.num_moe_experts if transformer_config else None
            grouped = transformer_config.moe_grouped_gemm if transformer_config else False
            return get_gpt_layer_local_spec(experts, grouped)
        return stock_get_specs(spec_name, transformer_config, use_te, *args, **kwargs)

    megatron_gpt_model.get_specs = get_specs


def _patch_build_model() -> None:
    from megatron.core.tensor_parallel import layers
    from nemo.collections.nlp.modules.common.megatron import build_model

    # Imported from apex only (NameError); megatron-core has the same function.
    build_model.set_defaults_if_not_set_tensor_model_parallel_attributes = (
        layers.set_defaults_if_not_set_tensor_model_parallel_attributes
    )


def _patch_base_model() -> None:
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    # setup() creates a torch.cuda.Stream for Transformer Engine layers, of which a CPU run has none.
    MegatronBaseModel.setup_transformer_engine_cp_groups = _noop


def _listify_model(model: Any) -> list[Any]:
    return model if isinstance(model, list) else [model]


def _patch_megatron_utils() -> None:
    from nemo.collections.nlp.modules.common.megatron import utils

    # Taken from apex only (NameError when the optimizer is set up). listify_model is trivial; the
    # norm classes only serve isinstance checks that keep norms out of weight decay, and without
    # apex megatron-core builds torch's own norms.
    utils.listify_model = _listify_model
    utils.FusedLayerNorm = torch.nn.LayerNorm
    utils.FastLayerNorm = torch.nn.LayerNorm
    utils.MixedFusedRMSNorm = torch.nn.RMSNorm


class _TorchOnCpu:
    """``torch`` as a module global, but a tensor factory asked for ``device="cuda"`` builds on the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _patch_schedules() -> None:
    from megatron.core.pipeline_parallel import schedules

    # forward_backward_no_pipelining counts tokens in torch.zeros(..., device="cuda").
    schedules.torch = _TorchOnCpu()


@contextlib.contextmanager
def _no_fork(self: Any, name: str = "") -> Iterator[None]:
    yield


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random

    # Its states are only seeded on a GPU (model_parallel_cuda_manual_seed), so fork() raises
    # "cuda rng state model-parallel-rng is not added"; on a CPU dropout uses torch's default generator.
    random.CudaRNGStatesTracker.fork = _no_fork
