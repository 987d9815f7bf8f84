"""Fault injection for the tests: a subclass of the production encode actor, selected by the
tests (``run(config, encoder=FaultyEncodeActor)`` or the ``tests.faults.driver`` CLI), with
hooks that production code never reads.

A hook is a named value read where the fault happens (an encode actor). Ray workers are
started by the raylet with the environment it had when the cluster started, so an
environment variable set later by a test never reaches them; a hook is therefore read from
the process environment first, then from the cluster's key-value store, where
:func:`injected` puts it for every worker of the cluster (drivers started as subprocesses
included).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
from ray import cloudpickle

from embedjob.stages.encode import EncodeActor, EncodeSpec, forward_cost

NAMESPACE = "embedjob-faults"

# seconds to sleep per encode call, so a test can kill the driver or an actor mid-run
ENCODE_DELAY_S = "EMBEDJOB_TEST_ENCODE_DELAY_S"
# a forward costing more tokens than this (padded: rows x longest row; packed: sum of
# lengths) raises torch.OutOfMemoryError, as a GPU would
OOM_ABOVE_TOKENS = "EMBEDJOB_TEST_OOM_ABOVE_TOKENS"
# comma-separated ids: a forward holding one of these rows ends the actor's process at once
# (os._exit: no exception, no cleanup), as a segfault in a kernel would, on every try
CRASH_ON_IDS = "EMBEDJOB_TEST_CRASH_ON_IDS"


def value(name: str) -> str | None:
    """The hook's value: the environment's, else the cluster's, else None."""
    if os.environ.get(name):
        return os.environ[name]
    import ray
    from ray.experimental import internal_kv

    if not ray.is_initialized() or not internal_kv._internal_kv_initialized():
        return None
    raw = internal_kv._internal_kv_get(name, namespace=NAMESPACE)
    return raw.decode() if raw else None


@contextlib.contextmanager
def injected(name: str, setting: str) -> Iterator[None]:
    """Set a hook for this process and every worker of the connected Ray cluster."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(name, setting, overwrite=True, namespace=NAMESPACE)
    try:
        yield
    finally:
        internal_kv._internal_kv_del(name, namespace=NAMESPACE)


class FaultyEncodeActor(EncodeActor):
    """``EncodeActor`` with three hooks, read when the actor starts: a delay per call
    (``ENCODE_DELAY_S``), simulated out-of-memory errors for forwards costing more than
    ``OOM_ABOVE_TOKENS`` tokens, and rows that end the process (``CRASH_ON_IDS``)."""

    def __init__(self, spec: EncodeSpec) -> None:
        super().__init__(spec)
        self.delay_s = float(value(ENCODE_DELAY_S) or 0)
        self.oom_above_tokens = int(value(OOM_ABOVE_TOKENS) or 0)
        self.crash_on_ids = set(filter(None, (value(CRASH_ON_IDS) or "").split(",")))
        self.crashing: set[bytes] = set()  # token ids of this block's crashing rows

    def __call__(self, table):
        if self.delay_s:
            time.sleep(self.delay_s)
        ids = table.column("_id").to_pylist()
        self.crashing = {np.asarray(t, np.int32).tobytes()
                         for i, t in zip(ids, table.column("input_ids").to_pylist(), strict=True)
                         if str(i) in self.crash_on_ids}
        return super().__call__(table)

    def encode_batches(self, batches: list[list[np.ndarray]]) -> list[np.ndarray]:
        for ids in batches:
            self._simulate_faults(ids)
        return super().encode_batches(batches)

    def encode_ids(self, ids: list[np.ndarray]) -> np.ndarray:
        self._simulate_faults(ids)
        return super().encode_ids(ids)

    def encode_spans(self, ids: list[np.ndarray], spans: list) -> list[np.ndarray]:
        self._simulate_faults(ids)  # late chunking's forward: window rows
        return super().encode_spans(ids, spans)

    def _simulate_faults(self, ids: list[np.ndarray]) -> None:
        if any(np.asarray(x, np.int32).tobytes() in self.crashing for x in ids):
            os._exit(13)  # the process dies mid-forward, as on a segfault
        self._simulate_oom(ids)

    def _simulate_oom(self, ids: list[np.ndarray]) -> None:
        cost = forward_cost(ids, self.spec.packed)
        if self.oom_above_tokens and cost > self.oom_above_tokens:
            import torch

            raise torch.OutOfMemoryError(
                f"simulated: {cost} tokens > {OOM_ABOVE_TOKENS}={self.oom_above_tokens}")


# Ray workers need not import this test module: the class travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
