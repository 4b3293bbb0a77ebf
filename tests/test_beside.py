"""Work started beside the main thread (a resize's tokenizer checks): a forked process, or a thread."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a fresh interpreter: whether a fork is safe depends on the threads the process already has.
SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    from nemo_vocab_ext.beside import Beside, end_children
    from nemo_vocab_ext.errors import TokenizerError

    def pid_and_double(x):
        return os.getpid(), 2 * x

    def fail(message):
        raise TokenizerError(message)

    def error_of(work):
        try:
            work.result()
        except BaseException as e:
            return e
        raise AssertionError("no error")

    sys.stdout.write("once ")  # buffered: a child that flushed its copy would print it again
    result = Beside.start(pid_and_double, 21)
    pid, value = result.result()
    assert value == 42 and pid != os.getpid(), (pid, value)
    assert result.result() == (pid, 42)  # asked again: the same answer

    # The work fills a buffer the caller reads (a child's own memory would not be seen).
    def fill(out, byte):
        out[:] = bytes([byte]) * len(out)
        return os.getpid()

    filled = Beside.start(fill, 7, out_bytes=3)
    assert filled.result() != os.getpid() and bytes(filled.out) == bytes([7, 7, 7])

    failed = Beside.start(fail, "tokens moved")
    for _ in range(2):
        e = error_of(failed)
        assert isinstance(e, TokenizerError) and str(e) == "tokens moved", e

    e = error_of(Beside.start(os._exit, 3))
    assert isinstance(e, RuntimeError) and "exit code 3" in str(e), e

    # failed() never waits: None while the work runs, its error once it has failed.
    slow = Beside.start(time.sleep, 0.3)
    assert slow.failed() is None and slow.result() is None and slow.failed() is None
    failing = Beside.start(fail, "found later")
    deadline = time.monotonic() + 60
    while failing.failed() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert str(failing.failed()) == "found later"

    # A command that fails first ends the work still running beside it.
    endless = Beside.start(time.sleep, 600)
    end_children()
    e = error_of(endless)
    assert isinstance(e, RuntimeError) and "exit code -15" in str(e), e

    # torch imported: its native threads make a fork unsafe, so the work runs on a thread.
    sys.modules["torch"] = None
    assert Beside.start(pid_and_double, 2).result() == (os.getpid(), 4)
    on_thread = Beside.start(fill, 5, out_bytes=2)
    assert on_thread.result() == os.getpid() and bytes(on_thread.out) == bytes([5, 5])
    del sys.modules["torch"]

    # Another thread running: a fork would copy none of it, so the work runs on a thread.
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        pid, value = Beside.start(pid_and_double, 1).result()
        assert (pid, value) == (os.getpid(), 2)
        e = error_of(Beside.start(fail, "on a thread"))
        assert isinstance(e, TokenizerError) and str(e) == "on a thread", e
    finally:
        stop.set()
        other.join()
    print("ok")
    """
)


def test_work_beside_runs_in_a_child_process_or_on_a_thread_and_returns_or_raises_as_called() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "once ok\n", (done.stdout, done.stderr)
