"""Write stage: rows go to a few long-lived writer actors that stream them into big Lance
files; the driver commits.

Each call (``write_block``, ``write_batch_rows`` rows) splits its rows into the output's and
the rejected table's, hands both with the rows per input unit to one ``RowWriter`` actor, and
returns one row of counters (``schema.RESULT_SCHEMA``, no fragments). A writer streams output
rows into one open Lance fragment write, which starts a new data file every ``rows_per_file``
rows, and holds the (small) rejected rows. ``RowWriter.flush``, called by the driver at every
commit and at the end, closes the write, writes the rejected rows (once per flush), and
returns the pickled fragments with the rows per unit they hold: the unit record committed
with them covers exactly their rows.

Memory of one writer: the queue of ``QUEUED_BATCHES`` record batches plus Lance's page
buffers (``max_page_bytes`` per column), whatever ``rows_per_file`` is; the rejected rows of
one commit interval (4 small columns). A writer that dies loses its unflushed rows: their
units are never recorded as done, and the run fails (a rerun redoes them).
"""

from __future__ import annotations

import hashlib
import pickle
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from embedjob import schema as S
from embedjob.schema import Status
from embedjob.stages.check import DUPLICATE_ID
from embedjob.storage import Storage

QUEUED_BATCHES = 2  # record batches a writer holds while Lance writes the one before
PUT_POLL_S = 1.0  # how often a blocked hand-over checks whether the file write failed


@dataclass(frozen=True, kw_only=True)
class WriteSpec:
    """Where and how the write stage writes.

    Attributes:
        output: The output table.
        rejected_output: The rejected-rows table.
        schema: The output's stamped schema.
        replace_schema: The output is being recreated over a table with another schema.
        storage: Resolved storage options.
        rows_per_file: Rows per output data file, at most.
    """

    output: str
    rejected_output: str
    schema: pa.Schema
    replace_schema: bool = False
    storage: Storage = field(default_factory=Storage)
    rows_per_file: int = 1 << 20


def write_block(table: pa.Table, *, spec: WriteSpec, writers: tuple) -> pa.Table:
    """``map_batches`` body: hand the rows to a writer, return one row of counters.

    The writer is picked by the batch's key, so a retried task's batch goes to the writer
    that may hold it already, which ignores it (``RowWriter.append``).
    """
    import ray

    status = table.column(S.STATUS)
    accepted = table.filter(pc.equal(status, int(Status.EMBED)))
    rejected = table.filter(pc.equal(status, int(Status.REJECTED)))
    if table.num_rows:
        key = batch_key(table)
        writer = writers[int.from_bytes(key[:8], "little") % len(writers)]
        ray.get(writer.append.remote(key, _to_main(accepted, spec.schema), _to_rejected(rejected),
                                     *_unit_rows(table)))
    counts = S.Counts(
        rows_embedded=accepted.num_rows,
        rows_rejected=rejected.num_rows,
        rows_duplicate=_sum(pc.equal(rejected.column(S.REASON), DUPLICATE_ID)),
        rows_truncated=_sum(accepted.column(S.TRUNCATED)),
        tokens=_sum(accepted.column(S.N_TOKENS)),
        processed_tokens=_sum(accepted.column(S.PROCESSED_TOKENS)),
    )
    if S.CHUNK in table.column_names:  # a chunk table: documents, chunks, documents' tokens
        counts.rows_embedded = _sum(pc.equal(accepted.column(S.CHUNK), 0))
        counts.chunks_embedded = accepted.num_rows
        counts.tokens = _sum(accepted.column(S.COUNTED_TOKENS))
    return result_row(counts=counts)


def result_row(*, main: list[bytes] = (), rejected: list[bytes] = (),
               units: Counter | None = None, counts: S.Counts | None = None) -> pa.Table:
    """One ``RESULT_SCHEMA`` row: fragments, counters, rows per unit."""
    units = units or Counter()
    row = {
        "main_fragments": [list(main)],
        "rejected_fragments": [list(rejected)],
        **{name: [value] for name, value in (counts or S.Counts()).counters().items()},
        "units": [list(units)],
        "unit_rows": [list(units.values())],
    }
    return pa.table(row, schema=S.RESULT_SCHEMA)


def _unit_rows(table: pa.Table) -> tuple[list[str], list[int]]:
    """Rows written per unit; a chunk table counts each row's share of its document
    (``schema.DOC_SHARE``, ``DOC_WEIGHT`` per document)."""
    if not table.num_rows:
        return [], []
    if S.DOC_SHARE not in table.column_names:
        units = pc.value_counts(table.column(S.UNIT)).to_pylist()
        return [u["values"] for u in units], [u["counts"] for u in units]
    sums = table.group_by(S.UNIT).aggregate([(S.DOC_SHARE, "sum")])
    return sums.column(S.UNIT).to_pylist(), sums.column(f"{S.DOC_SHARE}_sum").to_pylist()


def batch_key(table: pa.Table) -> bytes:
    """16 bytes naming a batch by its rows' (unit, key) pairs: a retried task's batch has
    the same one."""
    # values, not buffers: slices of one block share its buffers
    digest = hashlib.blake2b(digest_size=16)
    digest.update("\0".join(table.column(S.UNIT).to_pylist()).encode("utf-8", "surrogatepass"))
    digest.update(table.column(S.ROW).to_numpy().tobytes())
    if S.CHUNK in table.column_names:  # a chunk table: the chunks of one row share its key
        digest.update(table.column(S.CHUNK).to_numpy().tobytes())
    return digest.digest()


@dataclass(frozen=True)
class WriterPool:
    """The run's ``RowWriter`` actors (``--writers``)."""

    actors: tuple

    @classmethod
    def create(cls, spec: WriteSpec, count: int) -> WriterPool:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # no CPU reserved (like the id shards): a writer mostly waits on the store, and Lance
        # encodes on its own threads. Never restarted: a restarted writer would have lost
        # its rows silently; a dead one fails the run instead. On the driver's node: it
        # outlives a lost worker node, so a node-loss stop can commit what it holds (hard:
        # a soft affinity was seen spilling onto the worker node here).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                              soft=False)
        actor = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(RowWriter)
        return cls(actors=tuple(actor.remote(spec) for _ in range(count)))

    def flush(self) -> list[pa.Table]:
        """Every writer's ``flush`` (their result rows)."""
        import ray

        return ray.get([writer.flush.remote() for writer in self.actors])


class RowWriter:
    """A writer actor: streams output rows into open Lance files and holds rejected rows
    and the rows per unit until ``flush`` (every commit and at the end)."""

    def __init__(self, spec: WriteSpec) -> None:
        self.spec = spec
        self._stream: FragmentStream | None = None
        self._rejected: list[pa.Table] = []
        self._units: Counter = Counter()
        self._seen: set[bytes] = set()  # 16 bytes per batch of the run: a few MB at 1e9 rows

    def append(self, key: bytes, main: pa.Table, rejected: pa.Table, units: list[str],
               rows: list[int]) -> bool:
        """Take one write-stage batch; False (and nothing taken) when it was taken before
        (a task retried after its hand-over)."""
        if key in self._seen:
            return False
        if main.num_rows:
            if self._stream is None:
                mode = "overwrite" if self.spec.replace_schema else "append"
                self._stream = FragmentStream(self.spec.output, self.spec.schema, mode=mode,
                                              rows_per_file=self.spec.rows_per_file,
                                              storage=self.spec.storage)
            self._stream.put(main)
        if rejected.num_rows:
            self._rejected.append(rejected)
        self._units.update(dict(zip(units, rows, strict=True)))
        self._seen.add(key)
        return True

    def flush(self) -> pa.Table:
        """Close the open files, write the rejected rows; one ``RESULT_SCHEMA`` row with
        their fragments and the rows per unit they hold (no counters: those came with the
        write-stage results)."""
        main = self._stream.close() if self._stream is not None else []
        rejected = []
        if self._rejected:
            stream = FragmentStream(self.spec.rejected_output, S.REJECTED_SCHEMA,
                                    mode="append", rows_per_file=self.spec.rows_per_file,
                                    storage=self.spec.storage)
            for table in self._rejected:
                stream.put(table)
            rejected = stream.close()
        row = result_row(main=main, rejected=rejected, units=self._units)
        self._stream, self._rejected, self._units = None, [], Counter()
        return row


class FragmentStream:
    """One ``lance.fragment.write_fragments`` call, fed batch by batch from a queue on a
    thread of its own: Lance uploads as it goes and starts a new data file every
    ``rows_per_file`` rows, so what is held is the queue plus Lance's page buffers, not the
    file. Uncommitted fragments come back from ``close``."""

    def __init__(self, uri: str, schema: pa.Schema, *, mode: str, rows_per_file: int,
                 storage: Storage) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self._fragments: list = []
        self._error: BaseException | None = None
        kwargs = {"schema": schema, "mode": mode, "max_rows_per_file": rows_per_file,
                  "storage_options": storage.lance_options()}
        self._thread = threading.Thread(target=self._write, args=(uri, schema, kwargs),
                                        daemon=True, name="lance-write")
        self._thread.start()

    def put(self, table: pa.Table) -> None:
        """Queue a table's batches (blocks while the queue is full)."""
        for batch in table.to_batches():
            self._offer(batch)

    def close(self) -> list[bytes]:
        """End the write; the fragments it wrote, pickled.

        Raises:
            Exception: What the file write raised.
        """
        self._offer(None)
        self._thread.join()
        self._raise()
        return [pickle.dumps(fragment) for fragment in self._fragments]

    def _batches(self):
        while (batch := self._queue.get()) is not None:
            yield batch

    def _write(self, uri: str, schema: pa.Schema, kwargs: dict) -> None:
        from lance.fragment import write_fragments

        try:
            reader = pa.RecordBatchReader.from_batches(schema, self._batches())
            self._fragments = write_fragments(reader, uri, **kwargs)
        except BaseException as exc:  # handed to the caller's next put or close
            self._error = exc

    def _offer(self, item: pa.RecordBatch | None) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(item, timeout=PUT_POLL_S)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _sum(values: pa.ChunkedArray | pa.Array) -> int:
    """Sum of an int or bool column (0 when empty)."""
    if pa.types.is_boolean(values.type):
        values = values.cast(pa.int64())
    return int(pc.sum(values).as_py() or 0)


def _to_main(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = {name: table.column(S.LINEAGE.get(name, name)) for name in schema.names}
    return pa.table(columns).cast(schema)


def _to_rejected(table: pa.Table) -> pa.Table:
    ids = [None if v is None else str(v) for v in table.column(S.ID).to_pylist()]
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "reason": table.column(S.REASON),
            "source": table.column(S.SOURCE),
            "row": table.column(S.ROW),
        },
        schema=S.REJECTED_SCHEMA,
    )


def load_fragments(pickled: list[bytes]) -> list:
    """Pickled ``FragmentMetadata`` from the write stage -> objects to commit."""
    return [pickle.loads(blob) for blob in pickled]
