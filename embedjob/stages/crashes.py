"""Rows that kill the encode actor's process (a segfault in a kernel, an abort in a native
library): isolated after a bounded number of deaths and rejected with their reason.

Ray Data restarts a dead encode actor and retries its block there, for ever (its defaults:
``max_restarts`` and ``max_task_retries`` -1): a row that kills the process on every try
would stall the run. An exception cannot carry the news out of a dead process, so an actor
records what it starts in a small ledger actor beside the driver, before starting it:

1. Before a block, its key (the ``(source, row)`` keys of its rows) is started in the ledger,
   which answers how many earlier starts of it never finished: the deaths it caused.
2. Fewer than ``retries`` deaths: the block is encoded as usual, then marked finished.
3. ``retries`` deaths or more: the block is encoded row by row, each row started in the
   ledger first; a row whose earlier starts ended ``retries`` times in a death is not
   encoded again but rejected ("crashes the encoder").

A row of a poison block therefore costs at most ``2 x retries`` actor restarts, and every
other row of the block is still embedded. A death with a row in flight alone for another
reason (a node lost) counts too, hence ``retries`` deaths per row rather than one.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from embedjob import schema as S

BLOCK = "block:"  # prefix of a block's key (a row's key is its source#row)


class CrashLedger:
    """Starts and finishes per key (a block's or a row's); a Ray actor, one per run."""

    def __init__(self) -> None:
        self.started: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()

    def start(self, key: str) -> int:
        """Record a start of ``key``; return its earlier starts that never finished."""
        deaths = self.started[key] - self.finished[key]
        self.started[key] += 1
        return deaths

    def finish(self, key: str) -> None:
        self.finished[key] += 1

    def deaths(self) -> int:
        """Block starts that never finished: the actor deaths with a block in flight (a row
        started alone rides in its block's start, so rows are not counted again)."""
        return sum(self.started[k] - self.finished[k] for k in self.started
                   if k.startswith(BLOCK))


@dataclass(frozen=True)
class CrashWatch:
    """The run's ledger as the encode actors use it (picklable: an actor handle).

    Attributes:
        ledger: The ``CrashLedger`` actor.
        retries: Deaths a block may cause before it is encoded row by row, and a row in
            flight alone before it is rejected.
    """

    ledger: object
    retries: int

    @classmethod
    def create(cls, retries: int) -> CrashWatch:
        """A ledger on this process's node (the driver's: it outlives a lost worker node)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # hard, like the read tracker and the writers: a soft affinity may spill onto a
        # worker node, and losing that node would lose the crash counts with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                              soft=False)
        actor = ray.remote(num_cpus=0, scheduling_strategy=here)(CrashLedger)
        return cls(ledger=actor.remote(), retries=retries)

    def start(self, key: str) -> int:
        """Record the start (a round trip: it must be stored before the work can crash)."""
        import ray

        return ray.get(self.ledger.start.remote(key))

    def finish(self, key: str) -> None:
        self.ledger.finish.remote(key)  # no wait: the caller's next start is ordered after it

    def deaths(self) -> int:
        import ray

        return ray.get(self.ledger.deaths.remote())

    def reason(self, deaths: int) -> str:
        return (f"crashes the encoder: the encode actor died {deaths} times with this row "
                "in flight alone")


def row_keys(table: pa.Table) -> list[str]:
    """``source#row`` per row: the same row gets the same key in every retry of its block."""
    sources = table.column(S.SOURCE).to_pylist()
    rows = table.column(S.ROW).to_pylist()
    return [f"{s}#{r}" for s, r in zip(sources, rows, strict=True)]


def block_key(keys: list[str], encoded: np.ndarray) -> str:
    """One key for the rows of a block that are encoded (``encoded``: their indices)."""
    digest = hashlib.blake2b(digest_size=16)
    for i in encoded:
        digest.update(keys[i].encode())
        digest.update(b"\0")
    return BLOCK + digest.hexdigest()
