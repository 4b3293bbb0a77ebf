"""Work started beside the caller (a resize's tokenizer checks and new rows): its value, its error,
the buffer it fills (each part taken as soon as it is filled), and ``failed()`` that never waits."""

from __future__ import annotations

import threading

import pytest

from nemo_vocab_ext.beside import Beside
from nemo_vocab_ext.errors import TokenizerError


def fail(message: str) -> None:
    raise TokenizerError(message)


def test_the_value_comes_back_as_often_as_asked() -> None:
    work = Beside.start(lambda x: 2 * x, 21)
    assert work.result() == 42 and work.result() == 42


def test_the_work_fills_the_buffer_the_caller_reads() -> None:
    def fill(work: Beside[int], byte: int) -> int:
        work.out[:] = bytes([byte]) * len(work.out)
        return len(work.out)

    work = Beside.start(fill, 7, out_bytes=3)
    assert work.result() == 3 and bytes(work.out) == bytes([7, 7, 7])
    assert bytes(work.out_until(3)) == bytes([7, 7, 7])  # a work that has succeeded has filled it all


def test_a_filled_part_is_taken_while_the_work_goes_on() -> None:
    release = threading.Event()

    def two_parts(work: Beside[str]) -> str:
        work.out[:2] = b"ab"
        work.filled(2)
        assert release.wait(60)  # the rest waits until the caller has taken the first part
        work.out[2:] = b"cd"
        return "done"

    work = Beside.start(two_parts, out_bytes=4)
    assert bytes(work.out_until(2)) == b"ab"
    assert work.failed() is None and not release.is_set()  # taken while the work still runs
    release.set()
    assert bytes(work.out_until(4)) == b"abcd" and work.result() == "done"


def test_a_part_the_work_failed_before_filling_raises_its_error() -> None:
    def fails_after_one_part(work: Beside[None]) -> None:
        work.out[:1] = b"x"
        work.filled(1)
        raise TokenizerError("the second table failed")

    work = Beside.start(fails_after_one_part, out_bytes=2)
    with pytest.raises(TokenizerError, match="^the second table failed$"):
        work.out_until(2)
    assert bytes(work.out_until(1)) == b"x"  # what was filled before stays good


def test_even_an_empty_part_waits_for_the_work_to_say_so() -> None:
    """A table with no computed rows (a shrink) is not written before the tokenizer check has passed."""
    work: Beside[None] = Beside.start(lambda _work: fail("tokens moved"), out_bytes=0)
    with pytest.raises(TokenizerError, match="^tokens moved$"):
        work.out_until(0)


def test_the_error_is_raised_each_time_the_result_is_asked() -> None:
    work = Beside.start(fail, "tokens moved")
    for _ in range(2):
        with pytest.raises(TokenizerError, match="^tokens moved$"):
            work.result()


def test_failed_never_waits() -> None:
    release = threading.Event()
    running = Beside.start(release.wait, 60)
    assert running.failed() is None  # still running: no answer yet, and no wait
    release.set()
    assert running.result() is True and running.failed() is None

    failing = Beside.start(fail, "found later")
    with pytest.raises(TokenizerError):
        failing.result()
    assert str(failing.failed()) == "found later"
