"""Work started beside the caller (a resize's tokenizer checks and new rows): its value, its error,
the buffer it fills, and ``failed()`` that never waits."""

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
    def fill(out: memoryview, byte: int) -> int:
        out[:] = bytes([byte]) * len(out)
        return len(out)

    work = Beside.start(fill, 7, out_bytes=3)
    assert work.result() == 3 and bytes(work.out) == bytes([7, 7, 7])


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
