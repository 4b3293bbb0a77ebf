"""Tiny Megatron GPT configurations, environments and subprocess helpers for real NeMo on a CPU.

Cheap to import (no NeMo): the functions that need NeMo import it when called, inside the NeMo
process (:mod:`harness.make_model`, :mod:`harness.restore`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from omegaconf import DictConfig, OmegaConf, open_dict

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

STOCK_CONFIG = Path(__file__).with_name("tiny_gpt.yaml")
# The folder holding this package (the checkout's root): no install ships the harness, its subprocesses find it here.
HARNESS_ROOT = Path(__file__).absolute().parents[1]

# Any 40-hex name works: offline, huggingface_hub resolves refs/main to this snapshot folder.
_FAKE_GPT2_SHA = "0123456789abcdef0123456789abcdef01234567"


def offline_hf_home(path: str | Path) -> Path:
    """Make ``path`` an ``HF_HOME`` in which NeMo's ``GPT2BPETokenizer`` loads with ``HF_HUB_OFFLINE=1``.

    NeMo calls ``AutoTokenizer.from_pretrained('gpt2', vocab_file=..., merges_file=...)``: only the
    tokenizer class comes from the hub cache, the vocabulary comes from the given files.
    """
    home = Path(path)
    repo = home / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / _FAKE_GPT2_SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(_FAKE_GPT2_SHA)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024}
    (snapshot / "tokenizer_config.json").write_text(json.dumps(config))
    return home


def cpu_env(hf_home: str | Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a NeMo subprocess on a CPU, offline (``base`` defaults to ``os.environ``).

    ``HARNESS_ROOT`` comes first on its ``PYTHONPATH``, so that ``python -m harness.<module>`` runs.
    """
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HARNESS_ROOT), env.get("PYTHONPATH")]))
    env.update(
        {
            "NVIDIA_PYTORCH_VERSION": "24.12",  # NeMo parses it unconditionally outside NVIDIA containers
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    return env


class NemoRunError(RuntimeError):
    """A NeMo subprocess exited non-zero; ``log`` holds its whole output, the message its tail."""

    def __init__(self, argv: Sequence[str], returncode: int, log: str):
        self.returncode = returncode
        self.log = log
        super().__init__(f"python {' '.join(argv)} exited with {returncode}; log tail:\n{log[-4000:]}")


@dataclass(frozen=True)
class NemoJob:
    """``python <argv>`` run in ``folder``, its stdout and stderr in ``folder/<log_name>``."""

    argv: list[str]
    folder: Path
    log_name: str = "nemo.log"

    @classmethod
    def module(cls, module: str, args: Sequence[str], folder: Path) -> NemoJob:
        """``python -m module args``, logged to ``folder/<last part of module>.log``."""
        return cls(["-m", module, *args], folder, module.rsplit(".", 1)[-1] + ".log")

    @property
    def log(self) -> Path:
        return self.folder / self.log_name


def run_concurrently(
    jobs: Sequence[NemoJob], env: dict[str, str], *, timeout: float = 600, max_parallel: int | None = None
) -> list[NemoRunError | None]:
    """Run ``jobs``, at most ``max_parallel`` (default: one per CPU) at a time, and return each one's error.

    ``None`` stands for success. Output goes to log files, not pipes, so that no job blocks on a
    full pipe. A job still running ``timeout`` seconds after it started is killed; no process
    outlives the call.
    """
    limit = max(1, max_parallel or os.cpu_count() or 1)
    errors: list[NemoRunError | None] = [None] * len(jobs)
    waiting = list(enumerate(jobs))
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < limit:
                i, job = waiting.pop(0)
                job.folder.mkdir(parents=True, exist_ok=True)
                with open(job.log, "wb") as out:
                    cmd = [sys.executable, *job.argv]
                    proc = subprocess.Popen(cmd, env=env, cwd=job.folder, stdout=out, stderr=subprocess.STDOUT)
                running[i] = (proc, time.monotonic() + timeout)
            time.sleep(0.2)
            for i, (proc, deadline) in list(running.items()):
                if proc.poll() is None and time.monotonic() > deadline:
                    proc.kill()
                if (returncode := proc.poll()) is not None:
                    del running[i]
                    if returncode:
                        errors[i] = NemoRunError(jobs[i].argv, returncode, jobs[i].log.read_text(errors="replace"))
    finally:
        for proc, _ in running.values():  # only left on an exception (e.g. KeyboardInterrupt)
            proc.kill()
            proc.wait()
    return errors


class ForkServer:
    """A NeMo program in ``--serve`` mode: NeMo is imported once, each job runs in a child forked from it.

    A job costs a second or so instead of a new interpreter's ~15 s of imports, and still runs in
    a process of its own (its own process group, patches and globals), with its output in its own
    log. Jobs run one after another, in the order given. Single-process jobs only (no torchrun).
    ``argv`` is what follows ``python`` (``["-m", module]`` or ``[script]``); the program calls
    :func:`serve_forked` when given ``--serve``.
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str], folder: Path, name: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = folder / f"{name}_server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *argv, "--serve"],
                env=env,
                cwd=folder,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    @classmethod
    def for_module(cls, module: str, env: dict[str, str], folder: Path) -> ForkServer:
        """A server of ``python -m module``, its jobs logged to ``<folder>/<last part of module>.log``."""
        return cls(["-m", module], env, folder, module.rsplit(".", 1)[-1])

    def run(self, jobs: Sequence[tuple[Sequence[str], Path]], timeout: float = 600) -> list[NemoRunError | None]:
        """Run ``main(args)`` in ``folder`` for each ``(args, folder)``; return each one's error or ``None``.

        Each job's output is in ``folder/<name>.log``; the server kills a job after ``timeout`` seconds.
        """
        assert self.proc.stdin is not None and self.proc.stdout is not None
        logs = [folder / f"{self.name}.log" for _, folder in jobs]
        for (args, folder), log in zip(jobs, logs, strict=True):
            request = {"args": list(args), "folder": str(folder), "log": str(log), "timeout": timeout}
            self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        errors: list[NemoRunError | None] = []
        for (args, _), log in zip(jobs, logs, strict=True):
            line = self.proc.stdout.readline()  # the server times jobs out, so an answer or EOF comes
            if not line:
                self.close()
                raise RuntimeError(f"the {self.name} server stopped; its log ends:\n{self._log_tail()}")
            returncode = json.loads(line)["returncode"]
            errors.append(NemoRunError(args, returncode, log.read_text(errors="replace")) if returncode else None)
        return errors

    def close(self) -> None:
        """End the server (its current job first); idempotent."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _preload_nemo() -> None:
    """What every NeMo job imports: done once by a ``--serve`` process before it forks a child per job."""
    from harness.cpu_nemo import apply_cpu_patches

    apply_cpu_patches()
    import nemo.collections.nlp.models.language_modeling.megatron_gpt_model  # noqa: F401
    import nemo.collections.nlp.parts.megatron_trainer_builder  # noqa: F401


def job_args(main: Callable[[list[str]], int], argv: list[str] | None) -> list[str]:
    """A NeMo job module's arguments; with ``--serve`` alone, become its fork server instead (never returns)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--serve"]:  # jobs from stdin, see ForkServer
        serve_forked(main, _preload_nemo)
    return argv


def serve_forked(main: Callable[[list[str]], int], preload: Callable[[], None]) -> NoReturn:
    """The ``--serve`` side of :class:`ForkServer`: call ``preload``, then run each job of stdin in a fork.

    Requests are JSON lines on stdin, answers JSON lines on the original stdout; everything else
    the server prints goes to stderr, so that it can never corrupt the answers. Ends at the end of
    stdin, without the ~6 s an interpreter that imported NeMo takes to shut down: the children
    did the work, and the server has nothing to clean up.
    """
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    preload()
    for line in sys.stdin:
        job = json.loads(line)
        returncode = _run_in_fork(
            main, job["args"], Path(job["folder"]), Path(job["log"]), float(job["timeout"]), answers.fileno()
        )
        answers.write(json.dumps({"returncode": returncode}) + "\n")
    answers.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_in_fork(
    main: Callable[[list[str]], int], args: list[str], folder: Path, log: Path, timeout: float, answers_fd: int
) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    # os._exit skips the clean-ups that delete temporary files (the gloo store file, for one): the job
    # gets a temporary folder of its own, removed once it ends. A short path, as unix sockets need.
    job_tmp = tempfile.mkdtemp(prefix="nemo_job_")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        returncode = 1
        try:
            os.close(answers_fd)  # only the server answers
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.chdir(folder)
            tempfile.tempdir = os.environ["TMPDIR"] = job_tmp
            returncode = main(args)
        except SystemExit as e:
            returncode = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                # A normal exit would stop the Manager that megatron's checkpoint writer spawns. os._exit
                # does not, and must end the child here: it must never unwind into the server's loop.
                for child in multiprocessing.active_children():
                    child.terminate()
                    child.join()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(returncode)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
    finally:
        shutil.rmtree(job_tmp, ignore_errors=True)


def _stock_config() -> DictConfig:
    cfg = OmegaConf.load(STOCK_CONFIG)
    assert isinstance(cfg, DictConfig)
    return cfg


# What a CPU without apex or Transformer Engine needs (fused kernels and apex's fused_adam are GPU-only).
_CPU_MODEL_OVERRIDES: dict[str, Any] = {
    "mcore_gpt": True,
    "megatron_amp_O2": False,
    "use_cpu_initialization": True,
    "transformer_engine": False,
    "masked_softmax_fusion": False,
    "bias_activation_fusion": False,
    "bias_dropout_add_fusion": False,
    "gradient_accumulation_fusion": False,
    "persist_layer_norm": False,
    "get_attention_mask_from_fusion": False,
    "micro_batch_size": 2,
    "global_batch_size": 2,
    "optim": {"name": "adamw", "sched": {"warmup_steps": 1}},
    "data": {"data_impl": "mock", "data_prefix": [], "num_workers": 0},
}


def tiny_model_config(
    vocab_file: str | Path,
    merge_file: str | Path,
    *,
    tied: bool = True,
    num_layers: int = 2,
    hidden: int = 64,
    ffn: int = 256,
    heads: int = 4,
    seq: int = 64,
    divisible_by: int = 128,
    tp: int = 1,
) -> DictConfig:
    """The stock ``model:`` config, shrunk to an mcore GPT that builds and trains on a CPU in seconds.

    There is no config setting for the weights layout of a working model: NeMo 2.4.1's
    ``NLPSaveRestoreConnector`` writes the distributed ``model_weights/`` for every mcore model
    (unless ``fsdp``), and the legacy ``mcore_gpt=False`` GPT no longer builds. The single-file
    layout is a save-time choice: see :func:`save_nemo`.
    """
    cfg = _stock_config()
    model = cfg.model
    with open_dict(model):
        model.merge_with(_CPU_MODEL_OVERRIDES)
        model.share_embeddings_and_output_weights = tied
        model.num_layers = num_layers
        model.hidden_size = hidden
        model.ffn_hidden_size = ffn
        model.num_attention_heads = heads
        model.encoder_seq_length = seq
        model.make_vocab_size_divisible_by = divisible_by
        model.tensor_model_parallel_size = tp
        model.tokenizer.library = "megatron"
        model.tokenizer.type = "GPT2BPETokenizer"
        model.tokenizer.vocab_file = str(Path(vocab_file).resolve())
        model.tokenizer.merge_file = str(Path(merge_file).resolve())
    # Resolve ${model.encoder_seq_length} and friends while the whole tree is still there.
    resolved = OmegaConf.create(OmegaConf.to_container(model, resolve=True))
    assert isinstance(resolved, DictConfig)
    return resolved


def tiny_trainer_config(*, devices: int = 1, max_steps: int = 0) -> DictConfig:
    """The stock ``trainer:`` config for CPU: fp32 and no gradient clipping (NeMo's asserts CUDA tensors)."""
    trainer = _stock_config().trainer
    with open_dict(trainer):
        trainer.accelerator = "cpu"
        trainer.devices = devices
        trainer.precision = 32
        trainer.gradient_clip_val = 0.0
        trainer.max_steps = max_steps
        trainer.val_check_interval = max(max_steps, 1)
        trainer.limit_val_batches = 0
        trainer.log_every_n_steps = 1
        trainer.enable_progress_bar = False
    return trainer


def cpu_trainer(model_cfg: DictConfig, *, devices: int = 1, max_steps: int = 0) -> Trainer:
    """A Lightning trainer built as the stock script builds it (``MegatronTrainerBuilder``), for CPU."""
    from nemo.collections.nlp.parts.megatron_trainer_builder import MegatronTrainerBuilder

    cfg = OmegaConf.create(
        {
            "trainer": tiny_trainer_config(devices=devices, max_steps=max_steps),
            "model": model_cfg,
            # No exp_manager; its TFLOPs callback would only log an error without TensorBoard.
            "exp_manager": {"log_tflops_per_sec_per_gpu": False},
        }
    )
    return MegatronTrainerBuilder(cfg).create_trainer()


def fit_mock_data_to_vocab(vocab_size: int) -> None:
    """Keep megatron-core's mock dataset inside a tiny vocabulary.

    Its documents are ``1, 2, ..., length - 1, eod`` with lengths below the class attribute
    ``max_sequence_length`` (4096): ids a 500-token embedding table cannot look up (IndexError).
    """
    from megatron.core.datasets.gpt_dataset import MockGPTLowLevelDataset

    MockGPTLowLevelDataset.max_sequence_length = vocab_size


def save_nemo(model: Any, path: str | Path, *, single_file: bool = False) -> None:
    """``model.save_to(path)``; ``single_file`` writes ``model_weights.ckpt`` instead of ``model_weights/``.

    ``NLPSaveRestoreConnector.save_to`` writes a distributed checkpoint whenever the model has a
    sharded state dict (every mcore model) and otherwise, at TP=PP=1, delegates to NeMo's base
    ``SaveRestoreConnector``, which ``torch.save``s ``model.state_dict()`` as one file; calling that
    base connector is the single-file layout of older NeMo releases, and NeMo still restores it.
    ``save_to`` uses the folder of ``path`` as scratch space (``model_weights/``): give concurrent
    saves their own folders.
    """
    if single_file:
        from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

        model._save_restore_connector = SaveRestoreConnector()
    model.save_to(str(path))
