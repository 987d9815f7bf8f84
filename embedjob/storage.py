"""One set of storage options, resolved once, applied the same way to every storage client.

The canonical form is Lance's (object_store) keys. Values come from the standard AWS
environment variables and are overridden by ``--storage-option KEY=VALUE``. A
:class:`Storage` holds the resolved set (picklable: every stage gets it inside its spec) and
builds pyarrow, s3fs and Lance clients from it, each in its own spelling and each with its
own request-level retries (``CLIENT_RETRIES``). Secrets never reach a log line: the options
are left out of ``repr`` and :meth:`Storage.redacted` masks them.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from embedjob.errors import ConfigError, StorageError

logger = logging.getLogger(__name__)

# canonical key -> environment variable it is read from
ENV_KEYS: dict[str, str] = {
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "aws_endpoint": "AWS_ENDPOINT_URL",
    "aws_region": "AWS_REGION",
    "allow_http": "AWS_ALLOW_HTTP",
}
SECRET_KEYS = frozenset({"aws_secret_access_key", "aws_session_token", "aws_access_key_id"})
# Request-level retries, configured in each client (they retry throttling, 5xx and dropped
# connections themselves; the project's own backoff only covers what a client cannot:
# restarting a read unit after its last row, the lease).
PROBE_ATTEMPTS = 2  # the start-up reachability probe: fail fast on a wrong endpoint
PROBE_CONNECT_TIMEOUT_S = 5.0
CLIENT_RETRIES = 10  # attempts per request: ~1 min of AWS standard backoff (capped at 20 s)
# Lance (object_store): retries per request, the time one request may spend retrying, and a
# connect timeout. Lance wraps reads in retry loops of its own (a permanent 503 on a data file
# costs ~16 x (retries + 1) requests), so its per-request retries stay lower than the others'.
LANCE_RETRY_OPTIONS: dict[str, str] = {"client_max_retries": "3",
                                       "client_retry_timeout": "60",
                                       "connect_timeout": "10s"}


@dataclass(frozen=True)
class Listed:
    """One input file as its listing returned it.

    Attributes:
        uri: Full URI.
        size: Bytes.
        fingerprint: ``size:mtime_ns`` (or ``size:etag`` for an S3 glob): a changed file
            has another one.
    """

    uri: str
    size: int
    fingerprint: str


def _listed(uri: str, info: pafs.FileInfo) -> Listed:
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    return Listed(uri, int(info.size or 0), f"{info.size}:{mtime}")


@dataclass(frozen=True)
class Storage:
    """The resolved storage options and the clients they make.

    Attributes:
        options: Canonical (Lance/object_store) keys; never printed (``repr=False``).
    """

    options: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __hash__(self) -> int:  # the options dict is not hashable; its content is
        return hash(_key(self.options))

    @classmethod
    def resolve(cls, overrides: Mapping[str, str] | None = None) -> Storage:
        """The AWS environment variables with explicit overrides on top (overrides win).

        An ``aws_endpoint`` starting with ``http://`` implies ``allow_http=true``.
        """
        options = {key: os.environ[env] for key, env in ENV_KEYS.items() if os.environ.get(env)}
        if "aws_region" not in options and os.environ.get("AWS_DEFAULT_REGION"):
            options["aws_region"] = os.environ["AWS_DEFAULT_REGION"]
        options.update({k: str(v) for k, v in (overrides or {}).items()})
        if options.get("aws_endpoint", "").startswith("http://"):
            options.setdefault("allow_http", "true")
        return cls(options)

    def redacted(self) -> dict[str, str]:
        """Options safe to print: secrets replaced by ``***``."""
        return redacted(self.options)

    # --- clients -----------------------------------------------------------------------

    def pyarrow_fs(self, uri: str) -> pafs.FileSystem:
        """A pyarrow filesystem for ``uri`` (S3 needs ``endpoint_override`` explicitly)."""
        if not is_s3(uri):
            return pafs.LocalFileSystem()
        return _pyarrow_s3(_key(self.options))

    def fsspec(self, uri: str) -> Any:
        """An s3fs filesystem for an ``s3://`` uri, else None (local paths need none)."""
        return _s3fs(_key(self.options)) if is_s3(uri) else None

    def lance_options(self) -> dict[str, str]:
        """Storage options for Lance and lance_ray, with the client's retry settings."""
        return LANCE_RETRY_OPTIONS | dict(self.options)

    def open_lance(self, uri: str, version: int | None = None) -> Any:
        """The Lance dataset at ``uri`` (latest version unless ``version``)."""
        import lance

        return lance.dataset(uri, version=version, storage_options=self.lance_options())

    def open_input(self, uri: str, size: int | None = None) -> Any:
        """A random-access input file. On S3 pyarrow's open is a HEAD for the size; with
        ``size`` known (from the listing) the file opens without a request and every read
        is one ranged GET."""
        if size is not None and is_s3(uri):
            return RangedInput(self, uri, size)
        return self.pyarrow_fs(uri).open_input_file(strip_scheme(uri))

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file in one ranged GET (no HEAD: the caller knows
        the size from the listing)."""
        if is_s3(uri):
            return self.fsspec(uri).cat_file(strip_scheme(uri), start=start, end=end)
        with open(uri, "rb") as handle:
            handle.seek(start)
            return handle.read(end - start)

    # --- checks and listings -------------------------------------------------------------

    def lance_exists(self, uri: str) -> bool:
        """Whether a Lance dataset (any committed version) exists at ``uri``."""
        versions = strip_scheme(uri).rstrip("/") + "/_versions"
        try:
            info = self.pyarrow_fs(uri).get_file_info(
                pafs.FileSelector(versions, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"cannot check output {uri!r}: {exc}") from exc
        return len(info) > 0

    def list_files(self, uri: str, suffixes: tuple[str, ...]) -> list[Listed]:
        """Files named by ``uri``: one file, every matching file under a directory/prefix,
        or a glob. Full URIs (``s3://...`` or absolute local paths), sorted, so that a rerun
        sees the same order. Sizes and fingerprints come from the listing itself (S3:
        ListObjectsV2 pages), never from one request per file."""
        if not is_s3(uri):
            return _list_local(uri, suffixes)
        path = strip_scheme(uri)
        try:
            found = self._list_s3(path)
        except OSError as exc:
            raise StorageError(
                f"cannot list input {uri!r} at {self.endpoint_hint()}: {exc}") from exc
        return sorted((f for f in found if f.uri.endswith(suffixes)), key=lambda f: f.uri)

    def _list_s3(self, path: str) -> list[Listed]:
        if any(ch in path for ch in "*?["):
            # s3fs lists the glob's base prefix once and matches locally; ETag from the page
            matches = self.fsspec("s3://" + path).glob(path, detail=True)
            return [Listed("s3://" + p, int(i.get("size") or 0),
                           f"{i.get('size')}:{str(i.get('ETag', '')).strip(chr(34))}")
                    for p, i in matches.items() if i.get("type") != "directory"]
        fs = self.pyarrow_fs("s3://" + path)
        info = fs.get_file_info(path)  # one request for the input itself, not per file
        if info.type == pafs.FileType.File:
            return [_listed("s3://" + path, info)]
        if info.type == pafs.FileType.NotFound:
            return []
        selector = pafs.FileSelector(path, recursive=True)
        return [_listed("s3://" + i.path, i) for i in fs.get_file_info(selector)
                if i.type == pafs.FileType.File]

    def check_reachable(self, uri: str) -> None:
        """Fail early when the bucket of an ``s3://`` URI cannot be reached or is missing."""
        if not is_s3(uri):
            return
        bucket = strip_scheme(uri).split("/", 1)[0]
        try:
            # a client that gives up after PROBE_ATTEMPTS: a wrong endpoint fails in seconds,
            # not after a minute of the data clients' backoff
            info = _pyarrow_s3(_key(self.options), PROBE_ATTEMPTS).get_file_info(bucket)
        except OSError as exc:
            raise StorageError(f"cannot reach bucket {bucket!r} of {uri!r} at "
                               f"{self.endpoint_hint()}: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {bucket!r} of {uri!r} does not exist")

    def check_writable(self, uri: str) -> None:
        """Fail early when nothing can be written where ``uri`` lives.

        Checks the bucket exists, then writes and deletes one small object beside ``uri``
        (``<parent>/.embedjob-probe-<uuid>``), so a missing bucket, a read-only credential or
        an unwritable directory fails before any model loads.
        """
        self.check_reachable(uri)  # first: some servers create a missing bucket on write
        fs = self.pyarrow_fs(uri)
        parent = posixpath.dirname(strip_scheme(uri).rstrip("/"))
        probe = f"{parent}/.embedjob-probe-{uuid.uuid4().hex[:12]}"
        try:
            if not is_s3(uri):
                fs.create_dir(parent, recursive=True)
            with fs.open_output_stream(probe) as handle:
                handle.write(b"probe")
            fs.delete_file(probe)
        except OSError as exc:
            where = f" at {self.endpoint_hint()}" if is_s3(uri) else ""
            raise StorageError(f"cannot write to the location of {uri!r}{where}: {exc}") from exc

    def remove_tree(self, uri: str) -> None:
        """Delete a directory / prefix and everything under it (missing is fine)."""
        fs = self.pyarrow_fs(uri)
        path = strip_scheme(uri)
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    def endpoint_hint(self) -> str:
        return self.options.get("aws_endpoint") or "the default AWS endpoint"


def _key(options: Mapping[str, str]) -> str:
    """A hashable form of the options, for the per-process client caches."""
    return json.dumps(dict(options), sort_keys=True)


@functools.lru_cache(maxsize=8)
def _pyarrow_s3(key: str, attempts: int = CLIENT_RETRIES) -> pafs.S3FileSystem:
    options = json.loads(key)
    endpoint = options.get("aws_endpoint")
    kwargs: dict[str, Any] = {
        "access_key": options.get("aws_access_key_id"),
        "secret_key": options.get("aws_secret_access_key"),
        "session_token": options.get("aws_session_token"),
        "region": options.get("aws_region"),
        # AWS SDK standard mode: retries throttling (503 SlowDown), 5xx and transport errors
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
    }
    if attempts < CLIENT_RETRIES:
        kwargs["connect_timeout"] = PROBE_CONNECT_TIMEOUT_S
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or ("http" if _allow_http(options) else "https")
    return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})


@functools.lru_cache(maxsize=8)
def _s3fs(key: str) -> Any:
    """s3fs with the same settings (no region with a custom endpoint); botocore's standard
    retry mode retries throttling, 5xx and transport errors per request."""
    import s3fs

    options = json.loads(key)
    client_kwargs = {}
    if options.get("aws_endpoint"):
        client_kwargs["endpoint_url"] = options["aws_endpoint"]
    elif options.get("aws_region"):
        client_kwargs["region_name"] = options["aws_region"]
    return s3fs.S3FileSystem(
        key=options.get("aws_access_key_id"),
        secret=options.get("aws_secret_access_key"),
        token=options.get("aws_session_token"),
        client_kwargs=client_kwargs,
        config_kwargs={"retries": {"total_max_attempts": CLIENT_RETRIES, "mode": "standard"}},
    )


def _allow_http(options: Mapping[str, str]) -> bool:
    return str(options.get("allow_http", "false")).lower() in {"1", "true", "yes"}


def parse_storage_option(pair: str) -> tuple[str, str]:
    """Parse one ``KEY=VALUE`` flag value."""
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--storage-option {pair.split('=')[0]!r} must look like KEY=VALUE")
    return key.strip(), value


def redacted(options: Mapping[str, str]) -> dict[str, str]:
    """Options safe to print: secrets replaced by ``***``."""
    return {k: ("***" if k in SECRET_KEYS else v) for k, v in options.items()}


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def strip_scheme(uri: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key``; local paths become absolute."""
    return uri.split("://", 1)[1] if is_s3(uri) else os.path.abspath(uri)


def _list_local(uri: str, suffixes: tuple[str, ...]) -> list[Listed]:
    if any(ch in uri for ch in "*?["):
        found = [os.path.abspath(p) for p in glob.glob(uri, recursive=True) if os.path.isfile(p)]
    elif os.path.isfile(uri):
        found = [os.path.abspath(uri)]
    elif os.path.isdir(uri):
        found = [os.path.join(root, name) for root, _, names in os.walk(os.path.abspath(uri))
                 for name in names]
    else:
        return []
    listed = []
    for path in sorted(f for f in found if f.endswith(suffixes)):
        stat = os.stat(path)
        listed.append(Listed(path, stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}"))
    return listed


def validate_output_uri(uri: str, *, input_uri: str | None = None, label: str = "--output") -> str:
    """Check that a location the job writes to is exactly where the user pointed.

    Rules: a local path or ``s3://bucket/key`` (no other scheme); no backslashes or control
    characters; an ``s3://`` key has no ``.``, ``..`` or empty segments (clients normalize
    them differently, so the object written could differ from the one named or leave the
    prefix; local paths are resolved with ``os.path.abspath`` like every local path here)
    and names something below the bucket, not the bucket; never the input itself, inside
    the input location, or a parent of it (a run must not write into what it reads).

    Args:
        uri: The output or rejected-output URI.
        input_uri: The job's input (a file, directory/prefix or glob).
        label: What ``uri`` is, for messages ("output", "rejected_output").

    Returns:
        ``uri`` unchanged.

    Raises:
        ConfigError: naming the rule ``uri`` breaks.
    """
    scheme, sep, _ = uri.partition("://")
    if sep and not is_s3(uri):
        raise ConfigError(
            f"{label} {uri!r}: scheme {scheme + '://'!r} not in ['s3://', 'a local path']"
        )
    path = uri.split("://", 1)[1] if sep else uri
    bad = [c for c in path if ord(c) < 32 or ord(c) == 127 or c == "\\"]
    if bad:
        raise ConfigError(f"{label} {uri!r} contains {bad[0]!r}; control characters and "
                          "backslashes are not allowed in output paths")
    segments = path.rstrip("/").split("/")
    for segment in segments if sep else []:
        if segment in ("", ".", ".."):
            raise ConfigError(f"{label} {uri!r} has a {segment or 'empty'!r} key segment; "
                              "write the normalized key (no '.', '..' or '//')")
    if sep and len(segments) < 2:
        raise ConfigError(f"{label} {uri!r} is a bucket; name a dataset inside it, "
                          f"e.g. {uri.rstrip('/')}/vectors.lance")
    if input_uri is not None:
        _check_apart(uri, input_uri, label)
    return uri


def _check_apart(uri: str, input_uri: str, label: str) -> None:
    """The output must not overlap the input location (in either direction)."""
    if is_s3(uri) != is_s3(input_uri):
        return
    wild = min((i for i in (input_uri.find(c) for c in "*?[") if i >= 0), default=-1)
    # a glob's base is the directory before its first wildcard
    base = _normalized(input_uri if wild < 0 else input_uri[:wild].rsplit("/", 1)[0])
    out = _normalized(uri)
    if out == base or out.startswith(base + "/") or base.startswith(out + "/"):
        raise ConfigError(f"{label} {uri!r} overlaps the input {input_uri!r}; "
                          "write outside the input location")


def _normalized(uri: str) -> str:
    path = strip_scheme(uri) if is_s3(uri) else os.path.abspath(uri)
    return posixpath.normpath(path).rstrip("/")


class RangedInput(io.RawIOBase):
    """A read-only S3 file whose size the listing gave: opening it makes no request, every
    read is one ranged GET (``Storage.read_range``). s3fs's own file asks for the object's
    details (a HEAD) on its first read even when given the size."""

    def __init__(self, storage: Storage, uri: str, size: int) -> None:
        super().__init__()
        self._storage, self._uri, self._size, self._pos = storage, uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        data = self._storage.read_range(self._uri, self._pos, end)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
