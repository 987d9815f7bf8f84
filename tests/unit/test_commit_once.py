"""A commit whose store answer is lost lands once: ``driver.commit.commit_transaction``.

The fault is injected at Lance's commit call on a real local table (the network fault it
stands for, a reset after the store applied the manifest PUT, is met at random by
``tests/faults/test_flaky_store.py``; here it is made certain)."""

from __future__ import annotations

import lance
import pyarrow as pa
import pytest
from lance.dataset import Transaction
from lance.fragment import write_fragments

from embedjob.driver import commit
from embedjob.storage import Storage

pytestmark = pytest.mark.unit

RESET = OSError("Generic S3 error: error sending request: connection reset by peer")


@pytest.fixture
def table(tmp_path) -> str:
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(pa.table({"id": [0, 1]}), uri)
    return uri


def _append(uri: str, ids: list[int]) -> Transaction:
    fragments = write_fragments(pa.table({"id": ids}), uri, mode="append")
    return Transaction(read_version=lance.dataset(uri).version,
                       operation=lance.LanceOperation.Append(fragments))


def _faulty_commit(monkeypatch, *, apply_first: bool) -> list[int]:
    """Lance's commit fails once with a reset, after (apply_first) or before applying it."""
    real, calls = lance.LanceDataset.commit, []

    def commit_once_faulty(uri, transaction, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            if apply_first:
                real(uri, transaction, **kwargs)
            raise RESET
        return real(uri, transaction, **kwargs)

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(commit_once_faulty))
    monkeypatch.setattr(commit, "Backoff", lambda what: _NoWait(what))
    return calls


class _NoWait(commit.Backoff):
    def __init__(self, what: str) -> None:
        super().__init__(what, first_delay_s=0.0)


def test_a_commit_applied_before_its_error_is_found_not_repeated(table, monkeypatch):
    transaction = _append(table, [2, 3])
    calls = _faulty_commit(monkeypatch, apply_first=True)
    landed = commit.commit_transaction(table, transaction, Storage())
    assert len(calls) == 1  # not committed again
    assert landed.version == 2 == lance.dataset(table).version
    assert sorted(lance.dataset(table).to_table().column("id").to_pylist()) == [0, 1, 2, 3]


def test_a_commit_that_did_not_land_is_retried_once(table, monkeypatch):
    transaction = _append(table, [2, 3])
    calls = _faulty_commit(monkeypatch, apply_first=False)
    landed = commit.commit_transaction(table, transaction, Storage())
    assert len(calls) == 2
    assert landed.version == 2
    assert sorted(lance.dataset(table).to_table().column("id").to_pylist()) == [0, 1, 2, 3]


def test_a_permanent_error_is_raised_at_once(table, monkeypatch):
    transaction = _append(table, [2])

    def refuse(uri, transaction, **kwargs):
        raise ValueError("schema mismatch")

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(refuse))
    with pytest.raises(ValueError, match="schema mismatch"):
        commit.commit_transaction(table, transaction, Storage())
    assert lance.dataset(table).version == 1
