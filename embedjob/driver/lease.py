"""One writer per output: a lease file with an expiry, beside the output.

``<output>.lease.json`` names the run that holds the output and until when. A live run
renews it from a background thread every third of its time-to-live, so only a crashed run's
lease goes stale, and then only for ``lease_ttl_s``. A second run on the same output is
refused while the lease is live, with a message saying who holds it and until when.

The lease is a fence: before every commit the run calls :meth:`Lease.check`, which stops it
(``LeaseLostError``, before anything of that commit is written) when its renewals have failed
for a whole lifetime (another run may have taken the output since) or when the lease file
names another owner. A run that cannot renew therefore never commits after its lease could
have expired.

Acquisition is write-then-read-back (object stores have no portable compare-and-swap; S3's
conditional ``If-None-Match`` / ``If-Match`` writes are not used yet, see README "One writer
at a time"): two runs that start within the same instant can both write, but only the last
writer reads its own lease back; the other is refused, and the first check of the loser
stops it. Lance's own commit protocol stays the last line of defence: commits conflicting
with other writers are detected and retried by Lance.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from embedjob import schema as S
from embedjob.errors import StorageError, retry_transient
from embedjob.storage import Storage, is_s3, strip_scheme

logger = logging.getLogger(__name__)
READ_BACK_DELAY_S = 0.5  # long enough for a racing writer's PUT to land before we read


class OutputLockedError(StorageError):
    """Another live run holds the output's lease."""


class PreconditionFailed(OSError):
    """A conditional S3 write's precondition did not hold (HTTP 412)."""


class LeaseLostError(StorageError):
    """This run no longer holds the output's lease: it stops before its next commit."""


def lease_uri(output: str) -> str:
    return S.sibling_uri(output, "lease")


@dataclass
class Lease:
    """A held lease; use as a context manager around the run."""

    output: str
    ttl_s: float
    storage: Storage
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event)
    _renewed: float = 0.0  # time.monotonic() of the last write of the lease that succeeded
    _etag: str | None = None  # S3: the ETag of our last write (If-Match of the next one)
    _lost: bool = False  # S3: a renewal's If-Match failed: another run wrote the lease

    def __enter__(self) -> Lease:
        held = retry_transient(self._read, what=f"reading the lease of {self.output}")
        if held and held["owner"] != self.owner and held["expires_at"] > time.time():
            raise OutputLockedError(_held_message(self.output, held))
        if is_s3(self.output):  # conditional: exactly one of two racing runs wins
            return self._acquire_s3(held)
        retry_transient(self._write, what=f"writing the lease of {self.output}")
        time.sleep(READ_BACK_DELAY_S)
        held = retry_transient(self._read, what=f"reading the lease of {self.output}")
        if not held or held["owner"] != self.owner:
            raise OutputLockedError(_held_message(self.output, held or {}))
        self._renewed = time.monotonic()
        threading.Thread(target=self._renew, daemon=True, name="lease-renewal").start()
        return self

    def _acquire_s3(self, held: dict | None) -> Lease:
        """``If-None-Match: *`` when no lease exists, else ``If-Match`` on the expired
        lease's ETag: a run that raced us and wrote first makes our put fail (412)."""
        try:
            retry_transient(lambda: self._put(held.get("_etag") if held else None),
                            what=f"writing the lease of {self.output}")
        except PreconditionFailed as exc:
            now = retry_transient(self._read_s3, what=f"reading the lease of {self.output}")
            raise OutputLockedError(_held_message(self.output, now or {})) from exc
        self._renewed = time.monotonic()
        threading.Thread(target=self._renew, daemon=True, name="lease-renewal").start()
        return self

    def _put(self, if_match: str | None) -> None:
        """One conditional PUT of the lease record (s3fs; 412 -> ``PreconditionFailed``)."""
        bucket, key = self._path().split("/", 1)
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            response = self.storage.fsspec(self.output).call_s3(
                "put_object", Bucket=bucket, Key=key, Body=json.dumps(self._record()).encode(),
                **condition)
        except OSError as exc:
            if "pre-conditions" in str(exc) or "PreconditionFailed" in str(exc):
                raise PreconditionFailed(str(exc)) from exc
            raise
        self._etag = response["ETag"]

    def __exit__(self, *exc) -> None:
        self._stop.set()
        retry_transient(self._release, what=f"releasing the lease of {self.output}")

    def _release(self) -> None:
        held = self._read()
        if held and held["owner"] == self.owner:
            self._fs().delete_file(self._path())

    def check(self) -> None:
        """The fence, called before every commit.

        Raises:
            LeaseLostError: renewals failed for a whole lifetime, or the lease file names
                another owner (one read of it).
        """
        if self._lost:
            raise LeaseLostError(
                f"the lease on {self.output!r} was rewritten by another run (a renewal's "
                "If-Match failed): stopping before the next commit")
        stale = time.monotonic() - self._renewed
        if stale >= self.ttl_s:
            raise LeaseLostError(
                f"the lease on {self.output!r} could not be renewed for {stale:.0f} s (its "
                f"lifetime is {self.ttl_s:g} s), so another run may hold the output now: "
                "stopping before the next commit; rerun to resume from the last commit")
        try:
            held = self._read()
        except OSError as exc:  # unreadable now: the renewal clock above still bounds us
            logger.warning("could not read the lease on %s before a commit: %s",
                           self.output, exc)
            return
        if held is None or held.get("owner") != self.owner:
            raise LeaseLostError(
                f"the lease on {self.output!r} is no longer this run's "
                f"(owner {(held or {}).get('owner')}): stopping before the next commit")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if is_s3(self.output):
                    self._put(self._etag)
                else:
                    self._write()
                self._renewed = time.monotonic()
            except PreconditionFailed:
                logger.error("the lease on %s was rewritten by another run: this run stops "
                             "before its next commit", self.output)
                self._lost = True
                return
            except OSError as exc:  # the next renewal may succeed; check() fences commits
                logger.warning("could not renew the lease on %s: %s", self.output, exc)

    def _write(self) -> None:
        if not is_s3(self.output):
            self._fs().create_dir(os.path.dirname(self._path()), recursive=True)
        with self._fs().open_output_stream(self._path()) as out:
            out.write(json.dumps(self._record()).encode())

    def _record(self) -> dict:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "expires_at": time.time() + self.ttl_s}

    def _read(self) -> dict | None:
        """The lease record (on S3 with its ``_etag``), or None when there is none."""
        if is_s3(self.output):
            return self._read_s3()
        try:
            with self._fs().open_input_stream(self._path()) as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None
        except ValueError as exc:  # a torn or foreign file: not ours to interpret
            raise StorageError(f"cannot parse the lease of {self.output!r}: {exc}") from exc
        except OSError:
            if self._fs().get_file_info(self._path()).type == pafs.FileType.NotFound:
                return None
            raise

    def _read_s3(self) -> dict | None:
        # the ETag first: if the lease changes before the body is read, our If-Match on
        # the older ETag fails and we are refused (the safe side)
        fs, path = self.storage.fsspec(self.output), self._path()
        fs.invalidate_cache(path)
        try:
            etag = fs.info(path)["ETag"]
            raw = fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw) | {"_etag": etag}
        except ValueError as exc:  # a torn or foreign file: not ours to interpret
            raise StorageError(f"cannot parse the lease of {self.output!r}: {exc}") from exc

    def _fs(self) -> pafs.FileSystem:
        return self.storage.pyarrow_fs(self.output)

    def _path(self) -> str:
        return strip_scheme(lease_uri(self.output))


def _held_message(output: str, held: Mapping) -> str:
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(held.get("expires_at", 0)))
    return (f"output {output!r} is being written by another run (owner {held.get('owner')}, "
            f"host {held.get('host')}, pid {held.get('pid')}); its lease is renewed while it "
            f"lives and expires at {until} if it crashed: rerun after that to resume")
