"""Every checkpoint reader, fuzzed (``tools/fuzz.py``'s strategies): each mutated input reads, converts
or resizes correctly, or fails with the project's own error class; never another exception, a hang,
an access outside the input and output, or a successful command with a broken output.

Bounded and derandomized for CI (profile ``ci``); ``FUZZ_PROFILE=long`` runs more, randomly.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import fuzz  # noqa: E402

settings.register_profile("ci", fuzz.fuzz_settings(250, derandomize=True))
settings.register_profile("long", fuzz.fuzz_settings(3000, derandomize=False))
PROFILE_NAME = os.environ.get("FUZZ_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
# Hugging Face and Megatron folders: a case builds a dozen files and reads most, so fewer of them in CI.
FOREIGN_PROFILE = settings(PROFILE, max_examples=150) if PROFILE_NAME == "ci" else PROFILE
DEADLINE_S = 10.0  # per case: far above the ~20 ms one takes


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fuzz.Seed]:
    return fuzz.build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


def test_seeds_pass_unmutated(seeds: dict[str, fuzz.Seed]) -> None:
    """The property holds for every seed as written, under every command: what the fuzz mutates is sound."""
    for reader in seeds:
        for op in fuzz.seed_ops(reader):
            outcome = fuzz.run_case(seeds, fuzz.Case(reader, op, ()))
            assert outcome.label == "ok", (reader, op, outcome)


def test_sandbox_sees_accesses_outside(tmp_path: Path) -> None:
    """The check itself can fail: a read beside the input and a write into it are seen; a hard link of the
    input into the output is a read."""
    for d in ("in", "out", "tmp", "cwd"):
        (tmp_path / d).mkdir()
    (tmp_path / "secret.txt").write_text("x")
    with fuzz.watching(tmp_path) as accesses:
        (tmp_path / "in" / "model.nemo").write_text("x")
        (tmp_path / "secret.txt").read_text()
        (tmp_path / "out" / "ok").write_text("x")
        os.link(tmp_path / "in" / "model.nemo", tmp_path / "out" / "linked")  # as a run folder's output does
        os.link(tmp_path / "secret.txt", tmp_path / "out" / "stolen")
    assert [a.split(" at ")[0] for a in accesses] == [
        f"write {tmp_path}/in/model.nemo (open)",
        f"read {tmp_path}/secret.txt (open)",
        f"read {tmp_path}/secret.txt (os.link)",
    ]


def check_property(seeds: dict[str, fuzz.Seed], reader: str, data: st.DataObject) -> None:
    case = data.draw(fuzz.cases(seeds[reader]), label="case")
    outcome = fuzz.run_case(seeds, case, DEADLINE_S)
    assert not outcome.failed, (
        f"{outcome.label}\n{outcome.detail}\nrepro: python tools/fuzz.py --repro {shlex.quote(case.to_json())}"
    )


@pytest.mark.parametrize("reader", [r for r in fuzz.READERS if r not in fuzz.FOREIGN_READERS])
@PROFILE
@given(data=st.data())
def test_reader_property(seeds: dict[str, fuzz.Seed], reader: str, data: st.DataObject) -> None:
    check_property(seeds, reader, data)


@pytest.mark.parametrize("reader", fuzz.FOREIGN_READERS)
@FOREIGN_PROFILE
@given(data=st.data())
def test_foreign_reader_property(seeds: dict[str, fuzz.Seed], reader: str, data: st.DataObject) -> None:
    check_property(seeds, reader, data)
