"""Work run on a thread beside the caller's own: a resize reads and checks the tokenizers and computes
the new rows while every other entry is copied.

Measured on the 1.3B resize (docs/ab-resize.md): the work beside the copy pays (0.6 s of a 1.5 s
resize on two cores); running it in a forked process instead of on a thread did not (numpy and the
kernel copy release the GIL), so it runs on a thread.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Beside(Generic[T]):
    """Work run beside the caller: :meth:`start` it, ask :meth:`failed` (never waits) between steps of
    the caller's own work, and take its :meth:`result` (waits; raises the work's error) when needed.

    The work may fill ``out``, a buffer of ``out_bytes`` bytes, from its start, and say how far it has
    (:meth:`filled`): the caller takes a filled part (:meth:`out_until`) as soon as it is, before the
    work ends (a resize writes its first table while the next one is computed). Once the work has
    succeeded, all of ``out`` is filled.
    """

    def __init__(self, out_bytes: int) -> None:
        # Anonymous memory, not a bytearray: the kernel zeroes its pages as the work first writes them,
        # instead of the caller zeroing all of them before the work starts (15 ms for 57 MB here).
        self.out = memoryview(mmap.mmap(-1, out_bytes) if out_bytes else bytearray())
        self._changed = threading.Condition()
        self._filled: int | None = None  # None: the work has said nothing yet (not even that out[:0] is final)
        self._outcome: tuple[bool, Any] | None = None  # (succeeded, value or error) once it has ended

    @staticmethod
    def start(fn: Callable[..., T], *args: Any, out_bytes: int | None = None) -> Beside[T]:
        """Start ``fn(*args)`` (with ``out_bytes``, even 0, ``fn(work, *args)``: it fills ``work.out``)
        on a daemon thread: a command that fails first does not wait for it."""
        work: Beside[T] = Beside(out_bytes or 0)
        call_args = (work, *args) if out_bytes is not None else args

        def run() -> None:
            try:
                outcome: tuple[bool, Any] = (True, fn(*call_args))
            except BaseException as e:  # noqa: BLE001 - every error is the caller's to raise
                outcome = (False, e)
            with work._changed:
                work._outcome = outcome
                if outcome[0]:
                    work._filled = len(work.out)  # a work that has succeeded has filled its buffer
                work._changed.notify_all()

        threading.Thread(target=run, name=f"beside:{fn.__name__}", daemon=True).start()
        return work

    def filled(self, end: int) -> None:
        """Called by the work: ``out[:end]`` holds its final bytes."""
        with self._changed:
            self._filled = max(self._filled or 0, end)
            self._changed.notify_all()

    def out_until(self, end: int) -> memoryview:
        """``out[:end]`` once the work has said it is filled (waits, even for an empty part); the work's
        error if it fails first."""
        with self._changed:
            self._changed.wait_for(lambda: self._reached(end) or self._outcome is not None)
            reached = self._reached(end)
        if not reached:
            self.result()  # raises the work's error
        return self.out[:end]

    def _reached(self, end: int) -> bool:
        return self._filled is not None and self._filled >= end

    def result(self) -> T:
        """The work's value, once it is done (as often as asked); its error is raised."""
        with self._changed:
            self._changed.wait_for(lambda: self._outcome is not None)
        assert self._outcome is not None
        ok, value = self._outcome
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def failed(self) -> BaseException | None:
        """The work's error if it has already failed; None while it runs or once it succeeded."""
        outcome = self._outcome
        return None if outcome is None or outcome[0] else outcome[1]
