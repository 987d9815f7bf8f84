"""Domain errors of the job, and the one list of transient errors that are retried.

Per-job problems (bad config, unreachable storage) raise one of these before any work;
the CLI translates them once into a message and a non-zero exit. Per-row problems never
raise: the row is set aside in the rejected table with its reason.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


def did_you_mean(value: object, allowed: object) -> str:
    """`` (did you mean 'x'?)`` for the allowed value nearest ``value``; '' when none is near."""
    import difflib

    choices = [str(a) for a in allowed]
    near = [c for c in choices if str(value) and c.startswith(str(value))]  # a cut-off name
    near = near or difflib.get_close_matches(str(value), choices, n=1, cutoff=0.75)
    return f" (did you mean {near[0]!r}?)" if near else ""


class EmbedError(Exception):
    """Base of every error this project raises on purpose."""


class BugError(EmbedError, AssertionError):
    """An internal invariant broke (a row lost or duplicated between stages, an impossible
    state): this is a bug. The one way this project says so; the message ends in
    ""."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}")


# --- the model ------------------------------------------------------------------------


class ModelError(EmbedError):
    """A model could not be loaded or asked to do something it does not offer."""


class ModelSourceError(ModelError):
    """A model source (local dir, s3:// prefix, hub id) cannot be resolved or read."""


class CheckpointError(ModelError):
    """A checkpoint's files or tensors do not match what the loader expects."""


class UnknownTaskError(ModelError, ValueError):
    """A task name that the model has no adapter for."""


class UnsupportedDimError(ModelError, ValueError):
    """A Matryoshka dimension that the model does not offer."""


class MergedTaskError(ModelError, ValueError):
    """A task asked of an embedder whose weights have another task's adapter merged in."""


# --- the job --------------------------------------------------------------------------


class ConfigError(EmbedError, ValueError):
    """The job's configuration is invalid; the message names the value and what is allowed."""


class StorageError(EmbedError):
    """Object storage or a local path cannot be reached, read or written."""


class InputError(EmbedError):
    """The input location holds nothing the job can read."""


class OutputExistsError(ConfigError):
    """The output exists and the mode does not allow touching it."""


class CorruptInputError(InputError):
    """An input file cannot be parsed (``fail_fast``; otherwise it becomes a rejected row)."""


class RunStopped(EmbedError):
    """The run was asked to stop (SIGTERM / SIGINT) and stopped cleanly: what the writers had
    finished is committed, the lease released. ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TransientGiveUpError(StorageError):
    """A transient storage error outlasted the retry budget; the message says for how long."""


def lance_open_error(uri: str, exc: BaseException) -> StorageError:
    """One line for a Lance table that cannot be opened: "no Lance table at ..." when there is
    none, else Lance's message without its Rust source locations (``uri`` shown as given)."""
    text = str(exc)
    if "not found" in text.lower():
        return StorageError(f"no Lance table at {uri!r}")
    return StorageError(f"cannot open Lance table {uri!r}: {without_rust_paths(text)}")


def without_rust_paths(text: str) -> str:
    """``text`` without the ``, /.../file.rs:12:34`` locations Lance appends to its errors."""
    import re

    return re.sub(r",?\s*\S*\.rs:\d+:\d+", "", text).strip()


# Errors worth a retry with backoff, each transient for the reason given.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # the endpoint dropped or refused a connection: servers restart, LBs rotate
    TimeoutError,  # a slow or overloaded endpoint; the same request usually succeeds later
)
# pyarrow's S3 filesystem and Lance (object_store) raise a plain OSError for everything, so
# their transient failures are told apart by the message, each for the reason given.
TRANSIENT_MESSAGES: tuple[str, ...] = (
    "connection refused",  # the server is restarting or a load balancer rotated it out
    "connection reset",  # the server went away mid-request
    "couldn't connect",  # curl (pyarrow S3): nothing listening yet
    "curlcode: 7",  # curl's "failed to connect" (pyarrow S3)
    "network_connection",  # AWS SDK error kind for a dropped connection (pyarrow S3)
    "timed out",  # a slow or overloaded endpoint
    "slowdown",  # S3 throttling (HTTP 503 SlowDown): back off and the same call succeeds
    "service unavailable",  # HTTP 503 while a server or its volumes start
    "internalerror",  # S3 HTTP 500 InternalError: documented by AWS as retryable
    "error sending request",  # object_store (Lance): the request never got an answer
)
RETRY_BUDGET_S = 60.0  # give up after this long: longer than a server restart, shorter than a page
_RETRIES = [0]  # retries this process made in Backoff / retry_transient (``retries_made``)


def retries_made() -> int:
    """Retries this process's own backoff loops made so far (a run's summary reports the
    driver's; the storage clients' per-request retries happen inside them, unseen)."""
    return _RETRIES[0]


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is worth a retry."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, TRANSIENT_ERRORS):
            return True
        if isinstance(exc, OSError) and any(m in str(exc).lower() for m in TRANSIENT_MESSAGES):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class Backoff:
    """Jittered exponential backoff over a bounded time, for loops that cannot be a call."""

    def __init__(self, what: str, *, budget_s: float = RETRY_BUDGET_S,
                 first_delay_s: float = 0.5, max_delay_s: float = 8.0) -> None:
        self.what, self.budget_s, self.max_delay_s = what, budget_s, max_delay_s
        self.deadline = time.monotonic() + budget_s
        self.delay, self.attempt = first_delay_s, 0

    def wait(self, exc: Exception) -> None:
        """Sleep before the next attempt; re-raise ``exc`` unless it is transient.

        Raises:
            TransientGiveUpError: the budget is spent.
        """
        self.attempt += 1
        if not is_transient(exc):
            raise exc
        if time.monotonic() + self.delay > self.deadline:
            raise TransientGiveUpError(
                f"{self.what} still failing after {self.attempt} attempts over "
                f"{self.budget_s:.0f} s of transient errors; last: {type(exc).__name__}: {exc}"
            ) from exc
        _RETRIES[0] += 1
        logger.warning("%s failed (attempt %d, retrying in %.1f s): %s", self.what,
                       self.attempt, self.delay, exc)
        time.sleep(self.delay * (0.5 + random.random() / 2))
        self.delay = min(self.delay * 2, self.max_delay_s)


def retry_transient(
    call: Callable[[], T],
    *,
    what: str,
    budget_s: float = RETRY_BUDGET_S,
    first_delay_s: float = 0.5,
    max_delay_s: float = 8.0,
) -> T:
    """Run ``call``; retry transient errors with jittered exponential backoff.

    Only for calls that are safe to repeat (reads, writes of new files, idempotent deletes).

    Args:
        call: The operation, no arguments.
        what: What it does, for messages ("commit of s3://b/out.lance").
        budget_s: Give up after this many seconds of failures.

    Raises:
        TransientGiveUpError: the last transient error, once the budget is spent.
        Exception: any error that is not transient, at once.
    """
    backoff = Backoff(what, budget_s=budget_s, first_delay_s=first_delay_s,
                      max_delay_s=max_delay_s)
    while True:
        try:
            return call()
        except Exception as exc:
            backoff.wait(exc)
