"""Work run on a thread beside the caller's own: a resize reads and checks the tokenizers and computes
the new rows while every other entry is copied.

Measured on the 1.3B resize (docs/ab-resize.md): the work beside the copy pays (0.6 s of a 1.5 s
resize on two cores); running it in a forked process instead of on a thread did not (numpy and the
kernel copy release the GIL), so it runs on a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Beside(Generic[T]):
    """Work run beside the caller: :meth:`start` it, ask :meth:`failed` (never waits) between steps of
    the caller's own work, and take its :meth:`result` (waits; raises the work's error) when needed.

    The work may fill ``out``, a buffer of ``out_bytes`` bytes the caller reads once the result is in.
    """

    def __init__(self, out_bytes: int) -> None:
        self.out = memoryview(bytearray(out_bytes))
        self._done = threading.Event()
        self._outcome: tuple[bool, Any] = (False, RuntimeError("the work did not run"))

    @staticmethod
    def start(fn: Callable[..., T], *args: Any, out_bytes: int | None = None) -> Beside[T]:
        """Start ``fn(*args)`` (with ``out_bytes``, even 0, ``fn(out, *args)``) on a daemon thread: a
        command that fails first does not wait for it."""
        work: Beside[T] = Beside(out_bytes or 0)
        call_args = (work.out, *args) if out_bytes is not None else args

        def run() -> None:
            try:
                work._outcome = (True, fn(*call_args))
            except BaseException as e:  # noqa: BLE001 - every error is the caller's to raise
                work._outcome = (False, e)
            finally:
                work._done.set()

        threading.Thread(target=run, name=f"beside:{fn.__name__}", daemon=True).start()
        return work

    def result(self) -> T:
        """The work's value, once it is done (as often as asked); its error is raised."""
        self._done.wait()
        ok, value = self._outcome
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def failed(self) -> BaseException | None:
        """The work's error if it has already failed; None while it runs or once it succeeded."""
        if not self._done.is_set():
            return None
        ok, value = self._outcome
        return None if ok else value
