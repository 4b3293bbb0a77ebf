"""Work run beside the main thread: in a forked process where it can be, else on a thread.

A resize copies gigabytes in the kernel while it reads tokenizers, which is pure Python. On a thread
that work holds the GIL that the copying thread needs between two kernel copies; in a process it
runs truly in parallel and the copy never waits for it.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")


def start_beside(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    """Start ``fn(*args)`` and return what waits for its value (or raises its error); it may be called
    more than once. A forked process runs it when nothing but this thread runs in this process (a
    fork copies no other thread, so one holding a lock would leave it locked in the child); a thread
    runs it otherwise, or where there is no fork."""
    if threading.active_count() > 1 or "fork" not in multiprocessing.get_all_start_methods():
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="beside")
        future = pool.submit(fn, *args)
        pool.shutdown(wait=False)  # the thread ends with its one task
        return future.result
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    # daemon: the child is ended when this process exits first (an error raised before its result is read).
    child = context.Process(target=_run_and_send, args=(send, fn, args), daemon=True, name="nemo-vocab-ext beside")
    child.start()
    send.close()

    lock = threading.Lock()
    received: list[tuple[bool, Any]] = []

    def result() -> T:
        with lock:
            if not received:
                received.append(_receive(receive, child, fn.__name__))
        ok, value = received[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    return result


def _receive(receive: Connection, child: Any, name: str) -> tuple[bool, Any]:
    try:
        return receive.recv()  # type: ignore[no-any-return]
    except EOFError:  # killed, or ended without sending
        pass
    finally:
        receive.close()
        child.join()
    return False, RuntimeError(f"{name} ended without a result (exit code {child.exitcode})")


def _run_and_send(send: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        outcome: tuple[bool, Any] = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 - every error is the caller's to raise
        outcome = (False, e)
    try:
        send.send(outcome)
    except Exception as e:  # an error or value that does not pickle
        send.send((False, RuntimeError(f"{fn.__name__}: {outcome[1]!r} ({e})")))
    finally:
        send.close()
