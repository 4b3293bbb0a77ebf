"""The CPU NeMo harness and its fixtures are what they claim, and the bug this project fixes is real.

The tests marked ``nemo`` run real NeMo 2.4.1, in subprocesses, on the CPU.
"""

from __future__ import annotations

import os
import tarfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BASE_VOCAB, LARGER_VOCAB, NEMO_MODELS, NemoRestorer

from harness.tiny import HARNESS_ROOT, ForkServer, NemoJob, NemoRunError, run_concurrently
from nemo_vocab_ext.tokenization.load import read_vocab_json

EMBEDDING = "model.embedding.word_embeddings.weight"
OUTPUT_LAYER = "model.output_layer.weight"
HIDDEN = 64


def test_cpu_patches_do_nothing_on_a_gpu_machine_with_apex(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import cpu_nemo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_nemo, "_have_apex", lambda: True)
    monkeypatch.setattr(cpu_nemo, "_applied", False)
    synchronize = torch.cuda.synchronize
    cpu_nemo.apply_cpu_patches()
    assert cpu_nemo._applied is False and torch.cuda.synchronize is synchronize


@pytest.mark.parametrize("gpu", [True, False])
def test_cpu_patches_on_a_machine_without_apex(monkeypatch: pytest.MonkeyPatch, gpu: bool) -> None:
    from harness import cpu_nemo

    called: list[str] = []
    nested = "_patch_optimizer_step_sharding"  # called by _patch_nlp_overrides
    patches = [name for name in dir(cpu_nemo) if name.startswith("_patch_") and name != nested]
    for name in patches:
        monkeypatch.setattr(cpu_nemo, name, lambda name=name: called.append(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(cpu_nemo, "_have_apex", lambda: False)
    monkeypatch.setattr(cpu_nemo, "_applied", False)
    cpu_nemo.apply_cpu_patches()
    cpu_nemo.apply_cpu_patches()  # idempotent
    apex_and_te = ["_patch_build_model", "_patch_gpt_specs", "_patch_megatron_utils", "_patch_nlp_overrides"]
    assert sorted(called) == (apex_and_te if gpu else sorted(patches))


def test_run_concurrently_reports_each_job(tmp_path: Path) -> None:
    code = "import sys, time; time.sleep(0.3); print('out'); sys.exit(int(sys.argv[1]))"
    jobs = [NemoJob(["-c", code, str(rc)], tmp_path / f"job{i}") for i, rc in enumerate([0, 3, 0])]
    ok, failed, ok_too = run_concurrently(jobs, dict(os.environ), max_parallel=2)
    assert ok is None and ok_too is None
    assert isinstance(failed, NemoRunError) and failed.returncode == 3 and "out" in failed.log
    (slow,) = run_concurrently([NemoJob(["-c", "import time; time.sleep(30)"], tmp_path / "slow")], {}, timeout=0.5)
    assert isinstance(slow, NemoRunError) and slow.returncode < 0  # killed


_ECHO_SERVER = textwrap.dedent(
    """
    import os
    import tempfile

    from harness.tiny import serve_forked

    SEEN = []  # what each job adds here must not reach the next one


    def main(argv):
        SEEN.append(argv[0])
        print("pid", os.getpid(), "cwd", os.path.basename(os.getcwd()), "seen", SEEN)
        print("tmp", tempfile.gettempdir())
        if argv[1] == "raise":
            raise ValueError("boom")
        return int(argv[1])


    if __name__ == "__main__":
        serve_forked(main, lambda: None)
    """
)


def test_fork_server_runs_each_job_in_a_fresh_fork(tmp_path: Path) -> None:
    script = tmp_path / "echo.py"
    script.write_text(_ECHO_SERVER)
    server = ForkServer([str(script)], dict(os.environ, PYTHONPATH=str(HARNESS_ROOT)), tmp_path, "echo")
    try:
        jobs = [([name, code], tmp_path / name) for name, code in [("a", "0"), ("b", "3"), ("c", "raise"), ("d", "0")]]
        a, b, c, d = server.run(jobs)
        (e,) = server.run([(["e", "0"], tmp_path / "e")])  # a server serves any number of batches
    finally:
        server.close()
    assert server.proc.returncode == 0
    assert a is None and d is None and e is None
    assert isinstance(b, NemoRunError) and b.returncode == 3
    assert isinstance(c, NemoRunError) and c.returncode == 1 and "ValueError: boom" in c.log
    logs = {name: (tmp_path / name / "echo.log").read_text() for name in "abde"}
    assert all(f"cwd {name} seen ['{name}']" in log for name, log in logs.items())
    assert len({log.split()[1] for log in logs.values()}) == 4  # four processes
    tmps = [Path(log.split("tmp ")[-1].strip()) for log in logs.values()]
    assert len(set(tmps)) == 4 and not any(tmp.exists() for tmp in tmps)  # each job's own, removed after it


def members(nemo: Path) -> set[str]:
    with tarfile.open(nemo, "r:") as tar:
        return {name.removeprefix("./") for name in tar.getnames()}


def model_config(nemo: Path) -> dict:
    with tarfile.open(nemo, "r:") as tar:
        f = tar.extractfile("./model_config.yaml")
        assert f is not None
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def restored(
    restore_nemo: NemoRestorer, nemo_models: dict[str, Path], larger_tokenizer: Path
) -> dict[tuple[str, str], dict | NemoRunError]:
    """(model name, "base" or "larger" tokenizer) -> restore result, all restored in one batch."""
    keys = [(name, "base") for name in NEMO_MODELS] + [("tied_dist", "larger"), ("untied_dist", "larger")]
    keys += [("tied_single", "larger")]
    jobs = [(nemo_models[name], larger_tokenizer if tok == "larger" else None) for name, tok in keys]
    return dict(zip(keys, restore_nemo.many(jobs), strict=True))


def test_base_tokenizer(base_tokenizer: Path, larger_tokenizer: Path) -> None:
    base = read_vocab_json(base_tokenizer / "vocab.json")
    larger = read_vocab_json(larger_tokenizer / "vocab.json")
    assert len(base) == BASE_VOCAB and len(larger) == LARGER_VOCAB
    assert base["<|endoftext|>"] == 0
    assert all(larger[token] == i for token, i in base.items())  # the larger one extends the base one


@pytest.mark.nemo
@pytest.mark.parametrize("name", NEMO_MODELS)
def test_layout(nemo_models: dict[str, Path], name: str) -> None:
    names = members(nemo_models[name])
    assert "model_config.yaml" in names
    assert any(n.endswith("_vocab.json") for n in names) and any(n.endswith("_merges.txt") for n in names)
    if name.endswith("_dist"):
        assert {"model_weights/metadata.json", "model_weights/common.pt", "model_weights/.metadata"} <= names
        assert any(n.startswith("model_weights/__0_") and n.endswith(".distcp") for n in names)
        assert "model_weights.ckpt" not in names
    else:
        assert "model_weights.ckpt" in names
        assert not any(n.startswith("model_weights/") for n in names)


@pytest.mark.nemo
@pytest.mark.parametrize("name", NEMO_MODELS)
def test_tied_and_untied(nemo_models: dict[str, Path], saved_state: Callable[[Path], dict], name: str) -> None:
    saved = saved_state(nemo_models[name])
    tied = name.startswith("tied")
    cfg = model_config(nemo_models[name])
    assert cfg["share_embeddings_and_output_weights"] is tied
    assert cfg["mcore_gpt"] is True
    assert saved["vocab_size"] == BASE_VOCAB and saved["padded_vocab_size"] == 512
    assert saved["state_dict"][EMBEDDING].shape == (512, HIDDEN)
    if tied:
        assert OUTPUT_LAYER not in saved["state_dict"]
    else:
        assert saved["state_dict"][OUTPUT_LAYER].shape == (512, HIDDEN)
        assert not torch.equal(saved["state_dict"][OUTPUT_LAYER], saved["state_dict"][EMBEDDING])


@pytest.mark.nemo
def test_weights_are_random_not_trivial(nemo_models: dict[str, Path], saved_state: Callable[[Path], dict]) -> None:
    tables = [saved_state(path)["state_dict"][EMBEDDING] for path in nemo_models.values()]
    for table in tables:
        assert table.std() > 0.01 and (table.abs().sum(dim=1) > 0).all()
    # Each model has its own seed, so a mixed-up fixture cannot go unnoticed.
    assert all(not torch.equal(a, b) for i, a in enumerate(tables) for b in tables[i + 1 :])


@pytest.mark.nemo
@pytest.mark.parametrize("name", NEMO_MODELS)
def test_restore_round_trip(
    nemo_models: dict[str, Path],
    saved_state: Callable[[Path], dict],
    restored: dict[tuple[str, str], dict | NemoRunError],
    name: str,
) -> None:
    result = restored[(name, "base")]
    assert not isinstance(result, NemoRunError), result
    saved = saved_state(nemo_models[name])
    assert (result["vocab_size"], result["padded_vocab_size"]) == (BASE_VOCAB, 512)
    assert result["state_dict"].keys() == saved["state_dict"].keys()
    for key, tensor in saved["state_dict"].items():
        assert torch.equal(result["state_dict"][key], tensor), key


@pytest.mark.nemo
@pytest.mark.parametrize("name", ["tied_dist", "untied_dist"])
def test_bug_distributed_restore_with_larger_tokenizer_zero_pads_silently(
    nemo_models: dict[str, Path],
    saved_state: Callable[[Path], dict],
    restored: dict[tuple[str, str], dict | NemoRunError],
    name: str,
) -> None:
    """NeMo's silent behaviour: megatron-core does not check the stored size of vocab tables.

    A 512-row checkpoint restored with a 700-token tokenizer builds 768 rows, loads the first 512
    and leaves the rest exactly zero, without a message: the new tokens all get zero embeddings
    (and, untied, zero logits).
    """
    result = restored[(name, "larger")]
    assert not isinstance(result, NemoRunError), result
    saved = saved_state(nemo_models[name])["state_dict"]
    assert (result["vocab_size"], result["padded_vocab_size"]) == (LARGER_VOCAB, 768)
    for key in (EMBEDDING, OUTPUT_LAYER) if name.startswith("untied") else (EMBEDDING,):
        table = result["state_dict"][key]
        assert table.shape == (768, HIDDEN)
        assert torch.equal(table[:512], saved[key])
        assert torch.count_nonzero(table[512:]) == 0, key
    other = [k for k in saved if k not in (EMBEDDING, OUTPUT_LAYER)]
    assert all(torch.equal(result["state_dict"][k], saved[k]) for k in other)


@pytest.mark.nemo
def test_bug_single_file_restore_with_larger_tokenizer_fails(
    restored: dict[tuple[str, str], dict | NemoRunError],
) -> None:
    result = restored[("tied_single", "larger")]
    assert isinstance(result, NemoRunError)
    assert result.returncode != 0
    assert (
        "size mismatch for model.embedding.word_embeddings.weight: copying a param with shape "
        "torch.Size([512, 64]) from checkpoint, the shape in current model is torch.Size([768, 64])"
    ) in result.log


# The stock script's training-checkpoint path (exp_manager top-k + resume_if_exists), trimmed.
# Dropout off and a constant learning rate: a resumed run then matches a continuous one exactly
# (Lightning does not restore the RNG, and a resumed cosine schedule keeps the first max_steps).
_TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys

    from omegaconf import OmegaConf, open_dict


    def preload():
        from harness.cpu_nemo import apply_cpu_patches

        apply_cpu_patches()
        import nemo.collections.nlp.models.language_modeling.megatron_gpt_model  # noqa: F401
        import nemo.utils.exp_manager  # noqa: F401


    def main(argv):
        vocab_dir, log_dir, max_steps = argv[0], argv[1], int(argv[2])
        from harness.cpu_nemo import apply_cpu_patches, init_cpu_process_group

        apply_cpu_patches()
        from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
        from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronTrainerBuilder
        from nemo.utils.exp_manager import exp_manager
        from harness.tiny import fit_mock_data_to_vocab, tiny_model_config, tiny_trainer_config

        model = tiny_model_config(f"{vocab_dir}/vocab.json", f"{vocab_dir}/merges.txt")
        with open_dict(model):
            model.hidden_dropout = model.attention_dropout = 0.0
            model.optim.pop("sched")
        trainer = tiny_trainer_config(max_steps=max_steps)
        trainer.val_check_interval, trainer.limit_val_batches = 2, 1
        em = {
            "explicit_log_dir": log_dir, "resume_if_exists": True, "resume_ignore_no_checkpoint": True,
            "create_tensorboard_logger": False, "create_checkpoint_callback": True,
            "checkpoint_callback_params": {
                "monitor": "val_loss", "save_top_k": 1, "mode": "min", "save_last": True,
                "filename": "megatron_gpt--{val_loss:.2f}-{step}-{consumed_samples}", "model_parallel_size": 1,
            },
        }
        cfg = OmegaConf.create({"trainer": trainer, "model": model, "exp_manager": em})
        init_cpu_process_group()
        trainer = MegatronTrainerBuilder(cfg).create_trainer()
        exp_manager(trainer, cfg.exp_manager)
        model = MegatronGPTModel(cfg.model, trainer)
        fit_mock_data_to_vocab(model.tokenizer.vocab_size)
        trainer.fit(model)
        return 0


    if __name__ == "__main__":
        from harness.tiny import serve_forked

        sys.exit(serve_forked(main, preload) if sys.argv[1:] == ["--serve"] else main(sys.argv[1:]))
    """
)


def _last_checkpoint(log_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The ``-last`` training checkpoint (a torch_dist directory): its tensors, read with torch only, and common.pt."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (last,) = (log_dir / "checkpoints").glob("*-last")
    flat = log_dir / "last.pt"
    dcp_to_torch_save(last, flat)
    return torch.load(flat, weights_only=False), torch.load(last / "common.pt", weights_only=False)


@pytest.mark.nemo
def test_training_checkpoint_saves_and_resumes_optimizer_state(
    tmp_path: Path, base_tokenizer: Path, nemo_env: dict[str, str]
) -> None:
    """The optimizer-step patch: top-k checkpoints with AdamW state save, and a resume is exact."""
    script = tmp_path / "train.py"
    script.write_text(_TRAIN_SCRIPT)
    server = ForkServer([str(script)], nemo_env, tmp_path, "train")
    try:
        runs = [("resumed", 2), ("continuous", 4), ("resumed", 4)]  # the last one resumes the first
        jobs = [
            ([str(base_tokenizer), str(tmp_path / name), str(steps)], tmp_path / f"{name}_{steps}")
            for name, steps in runs
        ]
        for error in server.run(jobs):
            assert error is None, error
    finally:
        server.close()
    assert "Restored all states from the checkpoint" in (tmp_path / "resumed_4" / "train.log").read_text()

    resumed, resumed_common = _last_checkpoint(tmp_path / "resumed")
    continuous, _ = _last_checkpoint(tmp_path / "continuous")
    assert f"optimizer.state.exp_avg.{EMBEDDING}" in resumed
    assert resumed.keys() == continuous.keys()
    for key, value in continuous.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed[key], value), key
    assert resumed_common["global_step"] == 4
    assert int(resumed_common["optimizer_states"][0]["state"]["common_step"]) == 4
