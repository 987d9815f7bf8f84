"""Graceful stop: SIGTERM (``ray job stop``, Kubernetes) or SIGINT (Ctrl-C) to the driver.

The first signal stops the run taking new work: the wait for the next write-stage result is
broken off (the Ray Data execution is shut down with it), what the writers had already
handed to the driver is committed, the lease is released and the run raises
:class:`~embedjob.errors.RunStopped` (the CLI prints how to resume and exits 128 + the
signal: 130 for SIGINT, 143 for SIGTERM). The rerun starts at once and resumes from that
commit. If the commit and the release have not finished ``STOP_GRACE_S`` after the signal,
or a second signal arrives, the process exits at once with the same code (the lease then
expires after ``--lease-ttl-s``; the rerun resumes from the last commit as after a crash).

A thread of the driver can ask for the same stop (:meth:`Stop.request`: the node watch, when no
live node can hold an encode actor for ``--node-wait-s``); it wakes the main thread with
``WAKE_SIGNAL`` and the run ends with that request's reason and exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

# Kubernetes gives a pod 30 s (terminationGracePeriodSeconds) between SIGTERM and SIGKILL;
# the stop finishes inside it or exits by itself.
STOP_GRACE_S = 30.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)
WAKE_SIGNAL = signal.SIGUSR1  # a request from a driver thread: break off the wait for results


class StopRequested(BaseException):  # noqa: N818 - not an error: unwinds the result loop
    """Raised in the main thread while it waits for the next result, after a stop signal (a
    BaseException, so no ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int, reason: str | None = None, exit_code: int | None = None
                 ) -> None:
        super().__init__(reason or signal.Signals(signum).name)
        self.signum = signum
        self._exit_code = exit_code

    @property
    def exit_code(self) -> int:
        return self._exit_code if self._exit_code is not None else 128 + self.signum


class Stop:
    """Whether a stop was asked for, and where it may interrupt the driver.

    The signal handler only raises while the driver waits for the next write-stage result
    (:meth:`waiting`); anywhere else (a commit, the lease) the request is noted and
    :meth:`check` raises it at the next safe point, so a commit is never cut in half.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.reason: str | None = None  # a driver thread's request (``request``)
        self.exit_code: int | None = None
        self._interruptible = False
        self._handler = None
        self._wake = None
        self.done = threading.Event()  # set when the run's block has unwound

    def reinstall(self) -> None:
        """Take the signals back: ``ray.init`` installs Ray's own SIGTERM handler in the
        driver (it logs and aborts the process)."""
        if self._handler is not None and self.signum is None:
            for sig in SIGNALS:
                signal.signal(sig, self._handler)
            signal.signal(WAKE_SIGNAL, self._wake)

    @property
    def watched(self) -> bool:
        """Whether :meth:`request` can reach the main thread (the block runs in it)."""
        return self._handler is not None

    def request(self, reason: str, exit_code: int) -> None:
        """Ask for a stop from another thread of the driver (ignored once one is pending)."""
        if self.signum is not None or not self.watched:
            return
        self.reason, self.exit_code = reason, exit_code
        signal.pthread_kill(threading.main_thread().ident, WAKE_SIGNAL)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """A block the stop may interrupt (the wait for results)."""
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def check(self) -> None:
        """Raise the pending stop, if any."""
        if self.signum is not None:
            raise StopRequested(self.signum, self.reason, self.exit_code)

    def _requested(self, signum: int) -> None:
        self.signum = signum
        if self._interruptible:
            self._interruptible = False
            raise StopRequested(signum, self.reason, self.exit_code)


@contextmanager
def stop_on_signal() -> Iterator[Stop]:
    """Turn the first SIGTERM/SIGINT inside the block into a stop request (see :class:`Stop`).

    Outside the main thread (signals cannot be handled there) the request never comes.
    """
    stop = Stop()
    done = stop.done  # set when the block has unwound: the watchdog stands down
    if threading.current_thread() is not threading.main_thread():
        try:
            yield stop
        finally:
            done.set()
        return
    previous = {sig: signal.getsignal(sig) for sig in (*SIGNALS, WAKE_SIGNAL)}

    def handler(signum: int, _frame) -> None:
        for sig in SIGNALS:  # a second signal ends the process at once
            signal.signal(sig, lambda s, _f: os._exit(128 + s))
        logger.warning("%s received: stopping; committing what is written (at most %.0f s)",
                       signal.Signals(signum).name, STOP_GRACE_S)
        threading.Thread(target=_watchdog, args=(done, 128 + signum), daemon=True,
                         name="stop-watchdog").start()
        stop._requested(signum)  # noqa: SLF001

    def wake(signum: int, _frame) -> None:  # a driver thread's ``request``: a stop like a signal
        if stop.signum is None and stop.reason is not None:
            logger.warning("stopping: %s; committing what is written (at most %.0f s)",
                           stop.reason, STOP_GRACE_S)
            threading.Thread(target=_watchdog, args=(done, stop.exit_code), daemon=True,
                             name="stop-watchdog").start()
            stop._requested(signum)  # noqa: SLF001

    stop._handler = handler  # noqa: SLF001
    stop._wake = wake  # noqa: SLF001
    stop.reinstall()
    try:
        yield stop
    finally:
        done.set()
        for sig, old in previous.items():
            signal.signal(sig, old)


def _watchdog(done: threading.Event, code: int) -> None:
    """Exit the process with ``code`` unless the stop has finished within STOP_GRACE_S."""
    if not done.wait(STOP_GRACE_S):
        logger.error("the stop did not finish within %.0f s: exiting now", STOP_GRACE_S)
        os._exit(code)
