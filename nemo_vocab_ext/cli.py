"""The ``nemo-vocab-ext`` command line: a thin layer over the library.

Known errors end here as one line and an exit code (1 for bad input, 2 for usage); ``--debug``
shows the traceback. The checkpoint library is imported by the commands that read checkpoints,
not at start-up, and torch (about 3 s to import) only by those that compute on tensor values:
``--help`` and the tokenizer commands start at once, and ``convert`` never imports torch.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import NoReturn

import click

from .cli_common import report_errors, say, stages
from .core.rows import Init
from .formats.detect import Format, format_for_destination
from .options import DEFAULTS, PADDING_INITS, ResizeOptions

INIT_CHOICES = click.Choice([i.value for i in Init])
VERIFY_OPTION = click.option(
    "--verify",
    is_flag=True,
    help="Also read every entry back and compare it bit for bit with the source (reads both again).",
)


class _Commands(click.Group):
    """The ``tokenizer`` group is imported when it is used: its module imports the tokenizer library."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "tokenizer"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "tokenizer":
            from .cli_tokenizer import tokenizer

            return tokenizer
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_Commands,
    epilog="""\b
Examples:
  nemo-vocab-ext inspect base.nemo
  nemo-vocab-ext validate base.nemo --tokenizer merged/ --tp 2 --data data/th_text_document
  nemo-vocab-ext resize base.nemo extended.nemo --tokenizer merged/ --init mean --dry-run
  nemo-vocab-ext convert extended.nemo extended.safetensors
""",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--quiet", "-q", is_flag=True, help="No progress or notes on stderr.")
@click.version_option(package_name="nemo_vocab_ext")
def main(debug: bool, quiet: bool) -> None:
    """Inspect, validate, convert and resize NeMo Megatron GPT checkpoints (.nemo, .ckpt, safetensors)."""


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@report_errors
def inspect(ckpt: Path, as_json: bool) -> None:
    """Show a checkpoint's layout, vocabulary and sizes."""
    from .describe import describe
    from .io import load_checkpoint

    loaded, fmt = load_checkpoint(ckpt)
    info = describe(loaded, str(fmt))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key:<{width}}  {value if value is not None else '-'}")


@main.command()
@click.argument("ckpt", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, path_type=Path),
    help="Tokenizer to train with (default: the checkpoint's own).",
)
@click.option("--tp", type=click.IntRange(min=1), help="Tensor-parallel size of the run (default: the config's).")
@click.option(
    "--divisible-by", type=click.IntRange(min=1), help="make_vocab_size_divisible_by (default: the config's)."
)
@click.option(
    "--data",
    "data",
    multiple=True,
    metavar="PREFIX",
    help="Megatron .bin/.idx prefix to scan for out-of-range ids; repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help='Print {"ok": ..., "checks": [...]}.')
@report_errors
def validate(
    ckpt: Path, tokenizer: Path | None, tp: int | None, divisible_by: int | None, data: tuple[str, ...], as_json: bool
) -> None:
    """Check padded vocab size, token ids, artifacts, tied weights, NaN/Inf and data. Exit 1 on any failure."""
    from .io import load_checkpoint
    from .validate import validate_checkpoint

    loaded, _ = load_checkpoint(ckpt)
    report = validate_checkpoint(
        loaded, tokenizer_path=tokenizer, tensor_parallel=tp, divisible_by=divisible_by, data_prefixes=data
    )
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo("\n".join(report.lines()))
        click.echo("ok" if report.ok else "FAILED")
    sys.exit(0 if report.ok else 1)


TO_OPTION = click.option(
    "--to", "to", type=click.Choice([f.value for f in Format]), help="Output format (default: from DST's suffix)."
)


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@TO_OPTION
@click.option(
    "--layout",
    type=click.Choice(["distributed", "single"]),
    help="Weight layout of DST (default: SRC's). mcore models: distributed as NeMo writes it, or one state-dict file.",
)
@click.option("--force", is_flag=True, help="Overwrite DST.")
@VERIFY_OPTION
@report_errors
def convert(src: Path, dst: Path, to: str | None, layout: str | None, force: bool, verify: bool) -> None:
    """Convert between .nemo, .ckpt and safetensors, one tensor at a time; the output is read back and checked."""
    from .io import convert_checkpoint

    fmt = format_for_destination(dst, Format(to) if to else None)
    with stages(4) as stage:
        loaded, src_fmt = convert_checkpoint(src, dst, fmt, layout=layout, force=force, verify=verify, stage=stage)
    checked = "compared bit for bit" if verify else "checked (names, shapes, dtypes)"
    say(f"wrote {dst} ({fmt}, {loaded.layout} layout) from {src} ({src_fmt}); {len(loaded.tensors)} entries {checked}")


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, path_type=Path),
    help="The merged tokenizer (vocab.json+merges.txt folder, tokenizer.json or .model).",
)
@TO_OPTION
@click.option("--vocab-size", type=click.IntRange(min=1), help="New tokenizer size, when no tokenizer is given.")
@click.option(
    "--init",
    "init",
    type=INIT_CHOICES,
    default=DEFAULTS.init.value,
    show_default=True,
    help="How new tokens' rows start (fvt needs both tokenizers; zeros, mean and normal need none).",
)
@click.option(
    "--padding-init",
    type=click.Choice([i.value for i in PADDING_INITS]),
    default=DEFAULTS.padding_init.value,
    show_default=True,
)
@click.option("--tp", type=click.IntRange(min=1), help="Tensor-parallel size to pad for (default: the config's).")
@click.option(
    "--divisible-by", type=click.IntRange(min=1), help="make_vocab_size_divisible_by (default: the config's)."
)
@click.option(
    "--pad-to-multiple-of",
    type=click.IntRange(min=1),
    help="Hugging Face model folders: table rows a multiple of N (default: the tokenizer's size).",
)
@click.option("--allow-shrink", is_flag=True, default=DEFAULTS.allow_shrink, help="Allow dropping trained rows.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="Seed of the 'normal' init.")
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite DST.")
@VERIFY_OPTION
@click.option(
    "--drop-optimizer",
    is_flag=True,
    help="Megatron run folders: write the model without its optimizer state (then train with --no-load-optim).",
)
@report_errors
def resize(
    src: Path,
    dst: Path,
    tokenizer: Path | None,
    to: str | None,
    vocab_size: int | None,
    init: str,
    padding_init: str,
    tp: int | None,
    divisible_by: int | None,
    pad_to_multiple_of: int | None,
    allow_shrink: bool,
    seed: int,
    dry_run: bool,
    force: bool,
    verify: bool,
    drop_optimizer: bool,
) -> None:
    """Grow (or, with --allow-shrink, shrink) the vocabulary of SRC into DST (.nemo, .ckpt or safetensors;
    a Hugging Face model folder into a Hugging Face model folder, a Megatron run folder into a run folder
    unless DST names another format)."""
    from .errors import CheckpointFormatError
    from .formats.detect import detect_format
    from .resize_job import run_resize

    if (tokenizer is None) == (vocab_size is None):
        raise click.UsageError("give exactly one of --tokenizer and --vocab-size")
    src_format = detect_format(src)
    if src_format is Format.HF and to is None:
        fmt = Format.HF
    else:
        # A run folder's name has no suffix: a Megatron run resizes into a run folder unless told otherwise.
        same = Format.MEGATRON if src_format is Format.MEGATRON else None
        try:
            fmt = format_for_destination(dst, Format(to) if to else None, unnamed=same)
        except CheckpointFormatError:
            from .io import load_checkpoint

            load_checkpoint(src)  # a source that cannot be read is the error to name (headers only)
            raise
    with stages(1 if dry_run else 5) as stage:
        lines = run_resize(
            src,
            dst,
            fmt=fmt,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            options=ResizeOptions(Init(init), Init(padding_init), seed, allow_shrink),
            tensor_parallel=tp,
            divisible_by=divisible_by,
            pad_to_multiple_of=pad_to_multiple_of,
            dry_run=dry_run,
            force=force,
            verify=verify,
            drop_optimizer=drop_optimizer,
            stage=stage,
        )
    click.echo("\n".join(lines))


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``), raised where the command is so that its clean-ups run, as for Ctrl-C."""


def _stop_on_sigterm() -> None:
    def handler(signum: int, _: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-ups run once, uninterrupted
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


def run() -> NoReturn:
    """The ``nemo-vocab-ext`` console script: :func:`main`, with SIGTERM ending a command as Ctrl-C
    does, its temporaries removed (exit code 143). Every temporary file of the command lies in one
    folder of its own (named with its process id, so that a later run removes it if this one is
    killed outright)."""
    from .atomic import scratch_dir

    _stop_on_sigterm()
    # One short command: the cyclic collector's passes over the tokenizers' 100k+ containers cost a
    # resize about 0.3 s of CPU (docs/ab-resize.md); what it would free (a few cycles) goes at exit.
    gc.disable()
    try:
        with scratch_dir() as scratch:
            tempfile.tempdir = str(scratch)
            main()
        code = 0
    except SystemExit as e:  # click ends every run this way
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except Terminated:
        code = 128 + signal.SIGTERM
        print("Error: terminated by SIGTERM; unfinished outputs and temporary files removed", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the command is over: nothing left to stop
    sys.exit(code)


if __name__ == "__main__":
    run()
