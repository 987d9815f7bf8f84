"""Duplicate ids, decided before the run by a distributed pre-pass; no process holds the corpus.

**The rule** (scheduling-independent): among the rows that share an id, the first in (source
order, row) order wins, where the source order is the order of the input listing (file names
sorted; Lance fragments by id). Every other row with that id is rejected as a duplicate,
whether or not the winner itself is embedded (a winner with an empty text is rejected for its
text; its id then has no row in the output). Rows whose id is null or cannot be cast take no
part. So the same corpus gives the same winners whatever the number of actors, the window or
read batch sizes, the task retries, or how a crashed run was resumed.

**How** (option "sharded compact state + pre-pass", argued in BENCHMARKS.md):

1. ``scan_ids`` (Ray Data tasks, one per unit) reads only the id column and sends, per row,
   a 96-bit id key (``hi`` uint64 + ``lo`` uint32: the integer id itself for integer ids, so
   exact; two independent 64-bit SipHash values of the text form otherwise) and an 8-byte
   order key ``source_index << 40 | row`` to one of ``S`` ``IdShard`` actors picked by the id
   key. A shard appends them to numpy arrays: 20 bytes per row, in that shard only.
2. ``resolve`` sorts each shard by (id key, order key); the first row of every id wins, the
   rest are losers (a row sent twice by a retried task is the same order key, never its own
   duplicate). The losers' order keys go to the shard that serves their source (by CRC-32 of
   the source name), and the 20-byte rows are freed (refresh keeps the 12-byte distinct keys).
3. The tokenize stage asks the source's shard which rows of ``[first, last]`` are losers:
   one small call per source per batch, no state in the task.

A resume scans every unit again (finished ones too: only their id column), so the rule
holds across the crash without streaming the committed ids through the driver.

Collisions: two distinct string ids share a 96-bit key with probability about n^2 / 2^97
(6e-12 at 10^9 ids); the later one would be rejected as a duplicate. Integer ids are exact.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from embedjob import schema as S
from embedjob.stages import read

logger = logging.getLogger(__name__)

ROW_BITS = 40  # order key = source_index << 40 | row: 1.1e12 rows per source
MAX_SOURCES = 1 << (64 - ROW_BITS)  # 16.7M sources
SEND_ROWS = 65536  # rows a scan task buffers before sending them to the shards
# SipHash keys (16 bytes each) of the two independent 64-bit halves of a string id's key
_KEY_HI, _KEY_LO = "embedjob-ids-hi.", "embedjob-ids-lo."
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing spreads integer ids over shards


def id_keys(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The 96-bit key of every id: (``hi`` uint64, ``lo`` uint32). Integer ids are their own
    key (exact); other ids hash their string form with two independent SipHash keys."""
    if pa.types.is_integer(ids.type):
        hi = ids.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64)
        return hi, np.zeros(len(hi), np.uint32)
    from pandas.util import hash_array

    values = ids.cast(pa.string()).to_numpy(zero_copy_only=False)
    return (hash_array(values, hash_key=_KEY_HI, categorize=False),
            hash_array(values, hash_key=_KEY_LO, categorize=False).astype(np.uint32))


def source_files(units: Sequence[str]) -> list[str]:
    """The files (or Lance fragments) of ``units``, in listing order: the rule's source
    order (a file split into byte-range units is one source; its rows are keyed by
    ``_row``, which grows through the file)."""
    return list(dict.fromkeys(read.unit_file(u) for u in units))


def source_shard(source: str, shards: int) -> int:
    """The shard that serves the losers of ``source`` (stable across processes)."""
    return zlib.crc32(source.encode("utf-8", "surrogatepass")) % shards


def _id_shard(hi: np.ndarray, shards: int) -> np.ndarray:
    return ((hi * _MIX) >> np.uint64(32)) % np.uint64(shards)


class IdShard:
    """One slice of the run's ids by id key (a Ray actor; ``DuplicateIndex.create``).

    During the scan: three numpy arrays, 20 bytes per row. After ``resolve``: the sorted
    order keys of the losers of the sources it serves (8 bytes per loser).
    """

    def __init__(self, sources: Sequence[str]) -> None:
        # only the sources this shard serves: source name -> index in the listing
        self._index = {name: i for i, name in sources}
        # per column, so that resolve concatenates and frees them one column at a time
        self._chunks: tuple[list[np.ndarray], ...] = ([], [], [])
        self._losers = np.zeros(0, np.uint64)

    def add(self, hi: np.ndarray, lo: np.ndarray, order: np.ndarray) -> None:
        for column, values in zip(self._chunks, (hi, lo, order), strict=True):
            column.append(values.copy())  # off the object store

    def resolve(self, serving: np.ndarray, shards: int) -> tuple:
        """Decide the winners of this shard's ids; return the losers' order keys split by the
        shard serving their source (``serving[source_index]``), then (rows, distinct ids)."""
        # peak: the 20 bytes per row, the 8-byte sort index and one gathered column
        hi, lo, order = (_pop_concat(c, t) for c, t in
                         zip(self._chunks, (np.uint64, np.uint32, np.uint64), strict=True))
        sort = np.lexsort((order, lo, hi))
        hi = hi[sort]
        lo = lo[sort]
        order = order[sort]
        del sort
        same_id = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
        first = np.concatenate([[True], ~same_id])[:len(order)]
        again = np.concatenate([[False], same_id & (order[1:] == order[:-1])])[:len(order)]
        # ``again``: the same row sent twice (a retried scan task), not a duplicate
        losers = order[~first & ~again]
        by_shard = serving[(losers >> np.uint64(ROW_BITS)).astype(np.int64)]
        parts = [np.sort(losers[by_shard == s]) for s in range(shards)]
        return (*parts, int(len(order) - again.sum()), int(first.sum()))

    def take_losers(self, *parts: np.ndarray) -> int:
        self._losers = np.sort(_concat(list(parts), np.uint64))
        return len(self._losers)

    def losers(self, source: str, first: int, last: int) -> np.ndarray:
        """Rows of ``source`` in ``[first, last]`` that lose their id to an earlier row."""
        index = self._index.get(source)
        if index is None:
            return np.zeros(0, np.int64)
        base = np.uint64(index << ROW_BITS)
        start = np.searchsorted(self._losers, base + np.uint64(first), side="left")
        end = np.searchsorted(self._losers, base + np.uint64(last), side="right")
        return (self._losers[start:end] - base).astype(np.int64)

    def count_losers(self, sources: np.ndarray, skipped: Sequence[tuple[int, int, int]]) -> int:
        """Losers among the rows of these source indexes, less those in the ``skipped``
        (source index, first row, end row) ranges (the run's one-to-one check)."""
        wanted = np.isin(self._losers >> np.uint64(ROW_BITS), sources.astype(np.uint64))
        for index, lo, hi in skipped:
            base = np.uint64(index << ROW_BITS)
            wanted &= ~((self._losers >= base + np.uint64(lo))
                        & (self._losers < base + np.uint64(hi)))
        return int(wanted.sum())

    def nbytes(self) -> int:
        """Bytes of numpy state held now (the benchmark's bytes per id)."""
        chunks = sum(a.nbytes for column in self._chunks for a in column)
        return chunks + self._losers.nbytes


def _pop_concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    """Concatenate ``parts`` and empty the list (the chunks are freed right away)."""
    out = _concat(parts, dtype)
    parts.clear()
    return out


def _concat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


@dataclass(frozen=True)
class DuplicateIndex:
    """The run's shards (picklable: actor handles), as the tokenize stage and driver use them.

    Attributes:
        shards: The ``IdShard`` actors.
    """

    shards: tuple

    @classmethod
    def create(cls, sources: Sequence[str], shards: int):
        """``shards`` actors, each told the sources it serves (``source_shard``)."""
        import ray

        if len(sources) >= MAX_SOURCES:
            raise ValueError(f"{len(sources)} input sources; the duplicate-id order key "
                             f"holds at most {MAX_SOURCES - 1}")
        serves: list[list[tuple[int, str]]] = [[] for _ in range(shards)]
        for i, name in enumerate(sources):
            serves[source_shard(name, shards)].append((i, name))
        actor = ray.remote(num_cpus=0)(IdShard)
        return cls(shards=tuple(actor.remote(s) for s in serves))

    def resolve(self, sources: Sequence[str]) -> tuple[int, int]:
        """After the scan: decide every id's winner. Returns (rows scanned, distinct ids).
        The losers move shard to shard; the driver only passes references."""
        import ray

        n = len(self.shards)
        serving = np.array([source_shard(s, n) for s in sources], np.int64)
        results = [s.resolve.options(num_returns=n + 2).remote(serving, n) for s in self.shards]
        ray.get([shard.take_losers.remote(*[r[j] for r in results])
                 for j, shard in enumerate(self.shards)])
        counts = ray.get([r[n] for r in results]), ray.get([r[n + 1] for r in results])
        return sum(counts[0]), sum(counts[1])

    def losers(self, sources: list, rows: np.ndarray) -> np.ndarray:
        """Mask of the rows (given by source name and row index) that are duplicates."""
        import ray

        found = np.zeros(len(rows), bool)
        names = np.array(sources, dtype=object)
        calls = []
        for source in dict.fromkeys(sources):
            # row -1 stands for the unreadable rest of a unit: it has no id
            where = np.flatnonzero((names == source) & (rows >= 0))
            if not len(where):
                continue
            first, last = int(rows[where].min()), int(rows[where].max())
            shard = self.shards[source_shard(source, len(self.shards))]
            calls.append((where, shard.losers.remote(source, first, last)))
        for where, ref in calls:
            found[where] = np.isin(rows[where], ray.get(ref))
        return found

    def count_losers(self, source_indexes: Sequence[int],
                     skipped: Sequence[tuple[int, int, int]] = ()) -> int:
        import ray

        wanted = np.asarray(source_indexes, np.int64)
        return sum(ray.get([s.count_losers.remote(wanted, list(skipped)) for s in self.shards]))

    def nbytes(self) -> list[int]:
        import ray

        return ray.get([s.nbytes.remote() for s in self.shards])


@dataclass(frozen=True, kw_only=True)
class ScanSpec:
    """What a scan task needs: the read spec (only its id column is read) and the shards."""

    read: read.ReadSpec
    index: DuplicateIndex


def scan_ids(batch: pa.Table, *, spec: ScanSpec) -> pa.Table:
    """``map_batches`` body over ``{"unit", "source_index", "size"}`` rows: send every row's
    id key and order key to the shards; return the rows scanned per unit."""
    units = batch.column("unit").to_pylist()
    indexes = batch.column("source_index").to_pylist()
    counts = [_scan_unit(unit, index, replace(spec, read=read.sized(spec.read, unit, size)))
              for unit, index, size in zip(units, indexes, read.unit_sizes(batch), strict=True)]
    return pa.table({"unit": units, "rows": pa.array(counts, pa.int64())})


def _scan_unit(unit: str, source_index: int, spec: ScanSpec) -> int:
    pending: list[pa.Table] = []
    rows = buffered = 0
    for table in _id_rows(unit, spec.read):
        pending.append(table)
        buffered += table.num_rows
        rows += table.num_rows
        if buffered >= SEND_ROWS:
            _send(pa.concat_tables(pending), source_index, spec.index)
            pending, buffered = [], 0
    if pending:
        _send(pa.concat_tables(pending), source_index, spec.index)
    return rows


def _id_rows(unit: str, spec: read.ReadSpec) -> Iterator[pa.Table]:
    """The unit's (row, id) with the read stage's casts; stops where the unit is damaged
    (the read stage records the damage; it raises there under ``fail_fast``)."""
    try:
        for table in read.iter_rows(unit, spec):
            yield table.select([S.ROW, S.ID])
    except (pa.ArrowInvalid, OSError) as exc:
        logger.info("%s: duplicate-id scan stops at damage (%s)", unit, type(exc).__name__)


def _send(table: pa.Table, source_index: int, index: DuplicateIndex) -> None:
    import ray

    ids = table.column(S.ID).combine_chunks()
    valid = ids.is_valid().to_numpy(zero_copy_only=False)
    hi, lo = id_keys(ids.filter(pa.array(valid)))
    rows = table.column(S.ROW).to_numpy()[valid].astype(np.uint64)
    order = np.uint64(source_index << ROW_BITS) | rows
    which = _id_shard(hi, len(index.shards))
    calls = []
    for s, shard in enumerate(index.shards):
        picked = which == s
        if picked.any():
            calls.append(shard.add.remote(hi[picked], lo[picked], order[picked]))
    ray.get(calls)  # backpressure: a scan task never runs ahead of the shards
