"""Ctrl-C (and SIGTERM) for long jobs: the first is acknowledged at once and ends the job after
its current batch, with what it did saved; a second ends the process at once.

"At once" even while the main thread is inside native code (a model call can take seconds, and
Python runs signal handlers only between bytecodes): the C-level handler writes each signal's
number to a socket (``signal.set_wakeup_fd``) before any Python code runs, and a watcher thread
reading that socket answers. Worker processes forked meanwhile stop writing to it, so a Ctrl-C
that the terminal sends to the whole process group still counts once.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ACKNOWLEDGED = "finishing the batch, Ctrl-C again to stop now"
STOPPED = "stopped now: the chunks already written are kept; run the same command to resume"
EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active = [False]  # a wakeup socket of ours is installed (in this process, not in forked children)


def _after_fork_in_child() -> None:
    if _active[0]:
        _active[0] = False
        signal.set_wakeup_fd(-1)  # the child's signals are not the user's second Ctrl-C


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _say_on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def stop_on_signals(stop: threading.Event, say: Callable[[str], None] = _say_on_stderr) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop`` (the caller finishes its batch and writes what it has) and
    ``say`` ACKNOWLEDGED at once; a second one says STOPPED and exits the process with 130 at
    once. Only the main thread can take signals: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)  # set_wakeup_fd needs a non-blocking fd
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: None)  # the watcher acts; a handler must exist for the wakeup fd
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    _active[0] = True
    finished = threading.Event()

    def watch() -> None:
        heard = 0
        while data := reader.recv(64):
            if finished.is_set():
                return
            heard += sum(1 for signum in data if signum in SIGNALS)
            if heard == 1:
                stop.set()
                say(ACKNOWLEDGED)
            elif heard > 1:
                say(STOPPED)
                sys.stdout.flush()
                os._exit(EXIT_INTERRUPTED)  # the user asked to stop now; finished chunks are whole

    watcher = threading.Thread(target=watch, name="arrowvision-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        for sig, handler in previous.items():  # from here on a signal acts as it did before
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        _active[0] = False
        finished.set()
        writer.close()  # the watcher's recv returns b"": it ends
        watcher.join(5)
        reader.close()
