"""The scale benchmark's parts: short-row corpora, a no-op encoder (so the pipeline's own
costs show), a per-process memory sampler, requests counted at the S3 server, and the
output's manifest and data-file figures. ``benchmarks/scale_bench.py`` runs them.

Every figure comes from one ``embedjob.driver.run.run`` of the real pipeline (pre-pass,
read, tokenize with the real XLM-R tokenizer, bucket, encode, write, commits); only the
encoder's forward is replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embedjob.bench import seaweed
from embedjob.bench.s3_counter import CountingProxy
from embedjob.stages.encode import EncodeActor, EncodeSpec

# ---------------------------------------------------------------- corpus


def write_short_corpus(directory: Path, *, rows: int, files: int,
                       row_group_rows: int | None = None, first_id: int = 0) -> list[Path]:
    """``files`` Parquet files of ``rows`` short rows in all (about 10 tokens each), ids
    ``first_id..``; ``row_group_rows`` caps the row groups (pyarrow's default otherwise)."""
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for f, (start, stop) in enumerate(_splits(rows, files)):
        ids = np.arange(first_id + start, first_id + stop, dtype=np.int64)
        texts = [f"row {i} of the scale benchmark, short" for i in ids.tolist()]
        path = directory / f"part-{f:06d}.parquet"
        pq.write_table(pa.table({"id": ids, "text": texts}), path,
                       row_group_size=row_group_rows)
        paths.append(path)
    return paths


def _splits(rows: int, parts: int) -> Iterator[tuple[int, int]]:
    edges = np.linspace(0, rows, parts + 1).astype(np.int64)
    return zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)


# ---------------------------------------------------------------- the no-op encoder


@dataclass(frozen=True)
class _NoModel:
    hidden_size: int
    device: str = "cpu"


class NoopEncodeActor(EncodeActor):
    """``EncodeActor`` without a model: every vector is the first unit vector, every forward
    costs nothing, the rest of the actor (blocks, checks, vector columns, heap trim) runs."""

    def __init__(self, spec: EncodeSpec) -> None:
        from embedjob.model import load_spec

        self.spec = spec
        self.dtype = np.dtype(spec.vector_dtype)
        self.embedder = _NoModel(hidden_size=load_spec(spec.model).hidden_size)
        self.out_of_memory = (MemoryError,)

    def encode_batches(self, batches: list[list[np.ndarray]]) -> list[np.ndarray]:
        return [self.encode_ids(ids) for ids in batches]

    def encode_ids(self, ids: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(ids), self.embedder.hidden_size), np.float32)
        out[:, 0] = 1.0
        return out


# ---------------------------------------------------------------- memory per process


@dataclass
class ProcessSampler:
    """Peak resident memory (VmRSS) of the driver and of every Ray process it started (its
    descendants: the local Ray's daemons and workers), every ``interval_s``, grouped by role:
    the Ray process title (``ray::IdShard``, ``ray::MapBatches(read_units)``, ...; the method
    name cut off) or the daemon's name (raylet, gcs_server). A worker reused for several
    roles counts for each it was seen in.
    """

    interval_s: float = 0.5
    driver: int = 0
    roles: dict[str, int] = field(default_factory=dict)
    # per worker process: its peak, the role it had then, and every role it was seen in
    # (Ray reuses an idle task worker for another function: its heap carries over)
    processes: dict[int, dict[str, Any]] = field(default_factory=dict)
    # the driver's peak split as /proc reports it: RssAnon (private heap: Python, Ray's C++
    # core worker, Arrow), RssFile (mapped libraries), RssShmem (object-store pages it touched)
    driver_kinds: dict[str, int] = field(default_factory=dict)
    driver_trace: list[int] = field(default_factory=list)  # the driver's VmRSS per sample
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> ProcessSampler:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def largest_worker(self) -> tuple[str, int]:
        workers = {k: v for k, v in self.roles.items() if k.startswith("ray::")}
        return max(workers.items(), key=lambda kv: kv[1]) if workers else ("", 0)

    def largest_processes(self, top: int = 5) -> list[dict[str, Any]]:
        """The ``top`` worker processes by peak: pid, peak MiB, the role at the peak, every
        role seen (in order), and the RSS at each tenth of its sampled life (growth vs a
        fixed cost)."""
        ranked = sorted(self.processes.items(), key=lambda kv: -kv[1]["peak"])[:top]
        return [{"pid": pid, "peak_mib": mib(p["peak"]), "role_at_peak": p["role_at_peak"],
                 "roles": p["roles"], "rss_mib_by_tenth": _tenths(p["trace"]),
                 "private_peak_mib": mib(p["private_peak"]),
                 "private_mib_by_tenth": _tenths(p["private"])}
                for pid, p in ranked]

    @property
    def largest_private(self) -> tuple[str, int]:
        """The worker process with the most private memory (VmRSS less RssShmem): its
        role at its RSS peak and that private peak."""
        if not self.processes:
            return "", 0
        p = max(self.processes.values(), key=lambda p: p["private_peak"])
        return p["role_at_peak"], p["private_peak"]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        rss = _vm_rss(os.getpid())
        self.driver_trace.append(rss)
        if rss > self.driver:  # which pages: private heap, mapped files, shared memory
            self.driver, self.driver_kinds = rss, _rss_kinds(os.getpid())
        for pid in _descendants():
            role = _role(pid)
            if role:
                kinds = _status_bytes(pid, ("VmRSS", "RssShmem"))
                rss = kinds.get("VmRSS", 0)
                self.roles[role] = max(self.roles.get(role, 0), rss)
                if role.startswith("ray::"):
                    self._track(pid, role, rss, rss - kinds.get("RssShmem", 0))

    def _track(self, pid: int, role: str, rss: int, private: int) -> None:
        """``private``: VmRSS less RssShmem, the pages only this process holds (the
        object-store pages a worker touched are shared: counted once per node, capped by
        the object store's size)."""
        p = self.processes.setdefault(pid, {"peak": 0, "role_at_peak": role, "roles": [],
                                            "trace": [], "private_peak": 0, "private": []})
        if not p["roles"] or p["roles"][-1] != role:
            p["roles"].append(role)
        if rss > p["peak"]:
            p["peak"], p["role_at_peak"] = rss, role
        p["trace"].append(rss)
        p["private_peak"] = max(p["private_peak"], private)
        p["private"].append(private)


def _tenths(trace: list[int]) -> list[float]:
    if not trace:
        return []
    return [mib(trace[min(len(trace) - 1, i * len(trace) // 10)]) for i in range(10)] \
        + [mib(trace[-1])]


def _descendants() -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return []


def _role(pid: int) -> str | None:
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    if title.startswith("ray::"):
        name = title.split(" ")[0]
        if name in ("ray::IDLE", "ray::IDLE_SPILL_WORKER", "ray::IDLE_RESTORE_WORKER"):
            return None
        return re.sub(r"\.[A-Za-z_]+$", "", name)  # ray::IdShard.add -> ray::IdShard
    base = os.path.basename(title)
    return base if base in ("raylet", "gcs_server") else None


def _rss_kinds(pid: int) -> dict[str, int]:
    return _status_bytes(pid, ("RssAnon", "RssFile", "RssShmem"))


def _vm_rss(pid: int) -> int:
    return _status_bytes(pid, ("VmRSS",)).get("VmRSS", 0)


def _status_bytes(pid: int, names: tuple[str, ...]) -> dict[str, int]:
    """The named kB fields of /proc/<pid>/status, in bytes ({} once the process is gone)."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name = line.split(":")[0]
            if name in names:
                found[name] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found


@dataclass
class HeapSnapshots:
    """The driver's Python heap (``tracemalloc``) while the run streams: a snapshot every
    ``interval_s``; ``show`` prints the traced peak and the largest holders, by allocation
    site, of the largest snapshot and of the last one (near the end of the run, when every
    unit has been planned, read and recorded). Off unless ``enabled``."""

    enabled: bool = False
    interval_s: float = 5.0
    frames: int = 12
    largest: tuple[int, Any] = (0, None)
    last: tuple[int, Any] = (0, None)
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> HeapSnapshots:
        import tracemalloc

        if self.enabled:
            tracemalloc.start(self.frames)
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import tracemalloc

        if self.enabled:
            self._stop.set()
            self._thread.join()
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    def _loop(self) -> None:
        import tracemalloc

        while not self._stop.wait(self.interval_s):
            snapshot = tracemalloc.take_snapshot()
            size = sum(stat.size for stat in snapshot.statistics("filename"))
            self.last = (size, snapshot)
            if size > self.largest[0]:
                self.largest = (size, snapshot)

    def show(self, top: int = 12) -> None:
        """Print the traced peak and the two snapshots' largest allocation sites."""
        if not self.enabled:
            return
        print(f"    driver heap: traced peak {mib(self.peak)} MiB", flush=True)
        for label, (size, snapshot) in (("largest", self.largest), ("last", self.last)):
            if snapshot is None:
                continue
            print(f"    {label} snapshot: {mib(size)} MiB traced", flush=True)
            for stat in snapshot.statistics("traceback")[:top]:
                frames = [f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback[-6:]]
                print(f"      {stat.size / 2**20:8.2f} MiB {stat.count:>8} blocks  "
                      + " < ".join(reversed(frames)), flush=True)


# ---------------------------------------------------------------- the output's figures


def output_figures(uri: str) -> dict[str, int]:
    """Bytes of the latest manifest and data files of a local Lance table."""
    root = Path(uri)
    manifests = sorted((root / "_versions").glob("*.manifest"), key=lambda p: p.stat().st_mtime)
    return {"manifest_bytes": manifests[-1].stat().st_size if manifests else 0,
            "data_files": sum(1 for _ in (root / "data").glob("*")),
            "versions": len(manifests)}


# ---------------------------------------------------------------- a counting S3 server


@dataclass
class CountingS3:
    """A SeaweedFS S3 server (the test suite's ``weed mini``) behind a counting proxy
    (``embedjob.bench.s3_counter``): every request any client makes is counted (``weed
    mini`` serves no Prometheus metrics)."""

    endpoint: str  # the proxy's
    proxy: CountingProxy
    options: dict[str, str]
    proc: subprocess.Popen

    def requests(self, bucket: str) -> dict[str, int]:
        """Requests made so far on ``bucket``, by HTTP method."""
        return dict(self.proxy.methods(f"/{bucket}"))

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.options["aws_access_key_id"],
                                 secret=self.options["aws_secret_access_key"],
                                 endpoint_url=self.endpoint)


@contextmanager
def counting_s3(weed: str, base_port: int = 18333) -> Iterator[CountingS3]:
    """Start ``weed mini`` on 127.0.0.1 behind a counting proxy; stop both afterwards."""
    root = Path(tempfile.mkdtemp(prefix="embedjob-scale-s3-"))
    key, secret = "scale", "scale-secret"
    proc, upstream = seaweed.start(weed, root, base_port=base_port, access_key=key,
                                   secret_key=secret)
    proxy = CountingProxy(upstream).__enter__()
    server = CountingS3(
        endpoint=proxy.endpoint, proxy=proxy,
        options={"aws_access_key_id": key, "aws_secret_access_key": secret,
                 "aws_endpoint": proxy.endpoint, "aws_region": "us-east-1",
                 "allow_http": "true"},
        proc=proc)
    try:
        _wait(server)
        yield server
    finally:
        proxy.__exit__(None, None, None)
        seaweed.stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _wait(server: CountingS3, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            server.filesystem().ls("/")
            return
        except Exception:  # noqa: BLE001 - not up yet, whatever the error
            time.sleep(0.5)
    raise RuntimeError(f"weed mini did not come up at {server.endpoint}")


def upload(server: CountingS3, paths: list[Path], bucket: str, prefix: str) -> str:
    """Copy local files to ``s3://bucket/prefix/``; returns that URI."""
    fs = server.filesystem()
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put([str(p) for p in paths], f"{bucket}/{prefix}/")
    return f"s3://{bucket}/{prefix}/"


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def record(name: str, summary: Any, sampler: ProcessSampler, files: int,
           extra: dict[str, Any]) -> dict[str, Any]:
    """One run's figures (the JSON record and the printed row)."""
    role, largest = sampler.largest_worker
    rows = summary.rows_read
    return {
        "run": name, "rows": rows, "files": files, "wall_s": summary.wall_s,
        "rows_per_s": round(rows / summary.wall_s, 1) if summary.wall_s else 0.0,
        "driver_peak_mib": mib(sampler.driver),
        "driver_peak_kinds_mib": {k: mib(v) for k, v in sampler.driver_kinds.items()},
        "driver_mib_by_tenth": _tenths(sampler.driver_trace),
        "largest_worker_peak_mib": mib(largest),
        "largest_worker": role,
        "largest_worker_private_mib": mib(sampler.largest_private[1]),
        "largest_worker_private": sampler.largest_private[0],
        "peak_mib_by_role": {k: mib(v) for k, v in sorted(sampler.roles.items())},
        "largest_processes": sampler.largest_processes(),
        **extra,
    }


# ---------------------------------------------------------------- bytes per id


def shard_bytes_per_row(rows: int, *, string_ids: bool, duplicate_every: int = 10,
                        chunk: int = 65536) -> dict[str, float]:
    """One ``IdShard`` (in this process, no Ray) fed ``rows`` rows the way scan tasks feed it;
    its numpy bytes and this process's RSS growth per row while scanning, the traced peak
    while resolving, and after. Every ``duplicate_every``-th row repeats an earlier id."""
    import tracemalloc

    from embedjob.stages.dedupe import IdShard, id_keys

    shard = IdShard([(0, "s")])
    before = _vm_rss(os.getpid())
    for start in range(0, rows, chunk):
        n = np.arange(start, min(rows, start + chunk), dtype=np.int64)
        values = np.where(n % duplicate_every == 0, n // 2, n)
        ids = pa.array([f"doc-{v:012d}" for v in values.tolist()]) if string_ids \
            else pa.array(values)
        hi, lo = id_keys(ids)
        shard.add(hi, lo, n.astype(np.uint64))
    scanning = shard.nbytes()
    grown = _vm_rss(os.getpid()) - before
    tracemalloc.start()
    parts = shard.resolve(np.zeros(1, np.int64), 1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    shard.take_losers(parts[0])
    return {"rows": rows, "numpy_bytes_per_row": scanning / rows,
            "rss_bytes_per_row": grown / rows, "resolve_peak_bytes_per_row": peak / rows,
            "after_bytes_per_row": shard.nbytes() / rows, "losers": len(parts[0])}


def dict_bytes_per_id(rows: int) -> float:
    """The former single registry's state: a dict id -> 64-bit row key, RSS growth per id."""
    before = _vm_rss(os.getpid())
    owner: dict[int, int] = {}
    for i in range(rows):
        owner.setdefault(i, (i * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    grown = _vm_rss(os.getpid()) - before
    del owner
    return grown / rows
