"""Work run beside the main thread: in a forked process where it can be, else on a thread.

A resize copies gigabytes in the kernel while it reads tokenizers and computes new rows. On a thread
that work holds the GIL that the copying thread needs between two kernel copies; in a process it
runs truly in parallel and the copy never waits for it.
"""

from __future__ import annotations

import atexit
import os
import pickle
import select
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Outcome = tuple[bool, Any]  # (True, value) or (False, the error)


class Beside(Generic[T]):
    """Work started by :func:`start_beside`. Calling it waits for the value (or raises the error),
    as often as asked; :meth:`failed` never waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None

    def __call__(self) -> T:
        with self._lock:
            if self._outcome is None:
                self._outcome = self._wait()
        ok, value = self._outcome
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def failed(self) -> BaseException | None:
        """The work's error if it has already failed; None while it runs or once it succeeded."""
        if not self._lock.acquire(blocking=False):  # another thread is waiting for the outcome
            return None
        try:
            if self._outcome is None and self._ended():
                self._outcome = self._wait()
            outcome = self._outcome
        finally:
            self._lock.release()
        return outcome[1] if outcome is not None and not outcome[0] else None

    def _wait(self) -> Outcome:
        raise NotImplementedError

    def _ended(self) -> bool:
        raise NotImplementedError


def start_beside(fn: Callable[..., T], *args: Any) -> Beside[T]:
    """Start ``fn(*args)`` in a forked process when nothing but this thread runs in this process (a
    fork copies no other thread, so one holding a lock would leave it locked in the child); on a
    thread otherwise, or where there is no fork. torch counts as running threads once imported: its
    native pools are invisible to ``threading`` and not safe to use after a fork."""
    if threading.active_count() > 1 or "torch" in sys.modules or not hasattr(os, "fork"):
        return _OnThread(fn, args)
    return _InChild(fn, args)


def end_children() -> None:
    """End work still running in child processes (a command that failed before it needed the result)."""
    for pid in list(_running):
        os.kill(pid, signal.SIGTERM)
        _ended_early[pid] = _reap(pid)


def _reap(pid: int) -> int:
    """Wait for a child, once; its exit code (negative: the signal that ended it)."""
    if pid in _ended_early:
        return _ended_early.pop(pid)
    _running.discard(pid)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


_running: set[int] = set()
_ended_early: dict[int, int] = {}  # children ended by end_children, and their exit codes
atexit.register(end_children)


class _OnThread(Beside[T]):
    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]):
        super().__init__()
        self._done = threading.Event()
        self._result: Outcome = (False, RuntimeError(f"{fn.__name__} did not run"))

        def run() -> None:
            try:
                self._result = (True, fn(*args))
            except BaseException as e:  # noqa: BLE001 - every error is the caller's to raise
                self._result = (False, e)
            finally:
                self._done.set()

        threading.Thread(target=run, name="beside", daemon=True).start()

    def _wait(self) -> Outcome:
        self._done.wait()
        return self._result

    def _ended(self) -> bool:
        return self._done.is_set()


class _InChild(Beside[T]):
    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]):
        super().__init__()
        self._name = fn.__name__
        read, write = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:  # the child: run, send the outcome, and leave without this process's clean-ups
            code = 0
            try:
                os.close(read)
                _run_and_send(write, fn, args)
            except BaseException:  # noqa: BLE001 - the parent reports a child that sent nothing
                code = 1
            finally:
                os._exit(code)
        os.close(write)
        _running.add(self._pid)
        self._read = read

    def _ended(self) -> bool:
        return bool(select.select([self._read], [], [], 0)[0])  # an outcome waits, or the pipe closed

    def _wait(self) -> Outcome:
        chunks = []
        try:
            while chunk := os.read(self._read, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(self._read)
            code = _reap(self._pid)
        if chunks:
            return pickle.loads(b"".join(chunks))  # type: ignore[no-any-return]
        return False, RuntimeError(f"{self._name} ended without a result (exit code {code})")


def _run_and_send(write: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        outcome: Outcome = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 - every error is the caller's to raise
        outcome = (False, e)
    try:
        data = pickle.dumps(outcome)
    except Exception as e:  # an error or value that does not pickle
        data = pickle.dumps((False, RuntimeError(f"{fn.__name__}: {outcome[1]!r} ({e})")))
    with os.fdopen(write, "wb") as out:
        out.write(data)
