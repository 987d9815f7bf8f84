"""Fault-injection hooks for the ``faults`` test tier; every hook is unset in production.

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
from collections.abc import Iterator

NAMESPACE = "embedjob-faults"

# seconds to sleep per encode call, so a test can kill the driver or an actor mid-run
ENCODE_DELAY_S = "EMBEDJOB_TEST_ENCODE_DELAY_S"
# a forward costing more tokens than this (padded: rows x longest row; packed: sum of
# lengths) raises torch.OutOfMemoryError, as a GPU would
OOM_ABOVE_TOKENS = "EMBEDJOB_TEST_OOM_ABOVE_TOKENS"


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
