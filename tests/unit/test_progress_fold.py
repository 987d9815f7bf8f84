"""A refresh commit records only what it changes; the walk folds the history back."""

from __future__ import annotations

import json
import time

import lance
import pyarrow as pa

from embedjob import schema as S
from embedjob.driver import progress

KEY = "k" * 32


def _commit(uri: str, props: dict[str, str], *, mode: str = "append") -> None:
    lance.write_dataset(pa.table({"x": [1]}), uri, mode=mode, transaction_properties=props)


def _refresh(uri: str, finished: dict, gone: list[str], *, checkpoint: bool = False) -> dict:
    props = progress.commit_properties(KEY, finished, first=checkpoint, last_run="{}",
                                       gone=None if checkpoint else gone)
    _commit(uri, props)
    return props


def test_refresh_delta_records_one_entry_and_the_fold_is_exact(tmp_path):
    uri = str(tmp_path / "t.lance")
    n = 50
    files = {f"s3://b/f{i}.parquet": (f"fp{i}", None) for i in range(n)}
    _commit(uri, progress.commit_properties(KEY, files, first=True, last_run="{}"),
            mode="create")
    props = _refresh(uri, {"s3://b/f3.parquet": ("fp3b", None)}, [])
    assert list(json.loads(props[S.TX_UNITS])) == ["s3://b/f3.parquet"]  # 1, not n
    assert json.loads(props[S.TX_GONE]) == []
    props = _refresh(uri, {"s3://b/new.parquet": ("fpn", None)},
                     ["s3://b/f7.parquet", "s3://b/f8.parquet"])
    assert list(json.loads(props[S.TX_UNITS])) == ["s3://b/new.parquet"]
    assert json.loads(props[S.TX_GONE]) == ["s3://b/f7.parquet", "s3://b/f8.parquet"]
    _refresh(uri, {"s3://b/f7.parquet": ("fp7c", None)}, ["s3://b/new.parquet"])  # f7 back
    walk = progress.walk_units(lance.dataset(uri))
    expected = {u: fp for u, (fp, _) in files.items() if u != "s3://b/f8.parquet"}
    expected |= {"s3://b/f3.parquet": "fp3b", "s3://b/f7.parquet": "fp7c"}
    assert walk.done == expected and walk.based and walk.deltas == 3 and walk.key == KEY


def test_byte_range_units_fold_with_their_key_ranges(tmp_path):
    uri = str(tmp_path / "t.lance")
    big = "s3://b/big.parquet"
    units = {f"{big}#bytes=0-10": ("a", (0, 5)), f"{big}#bytes=10-20": ("a", (5, 9))}
    _commit(uri, progress.commit_properties(KEY, units, first=True, last_run="{}"),
            mode="create")
    _refresh(uri, {f"{big}#bytes=0-20": ("b", (0, 12))}, sorted(units))
    walk = progress.walk_units(lance.dataset(uri))
    assert walk.done == {f"{big}#bytes=0-20": "b"}
    assert walk.ranges == {f"{big}#bytes=0-20": (0, 12)}


def test_a_checkpoint_ends_the_walk_and_a_pruned_history_is_not_based(tmp_path):
    uri = str(tmp_path / "t.lance")
    _commit(uri, progress.commit_properties(KEY, {"s3://b/a": ("1", None)}, first=True,
                                            last_run="{}"), mode="create")
    _refresh(uri, {"s3://b/b": ("2", None)}, [])
    _refresh(uri, {"s3://b/a": ("1", None), "s3://b/b": ("2", None)}, [], checkpoint=True)
    _refresh(uri, {}, ["s3://b/a"])
    walk = progress.walk_units(lance.dataset(uri))
    assert walk.done == {"s3://b/b": "2"} and walk.based and walk.deltas == 1
    # a prune that cut the checkpoint: the walk says so (refresh then reads everything)
    dataset = lance.dataset(uri)
    time.sleep(0.01)
    dataset.cleanup_old_versions(older_than=__import__("datetime").timedelta(0))
    pruned = progress.walk_units(lance.dataset(uri))
    assert pruned.done == {} and not pruned.based and pruned.key == KEY


def test_walk_time_for_many_commits(tmp_path):
    """Not a timing guard: prints the walk's cost per version for the record."""
    uri = str(tmp_path / "t.lance")
    _commit(uri, progress.commit_properties(KEY, {"s3://b/a": ("1", None)}, first=True,
                                            last_run="{}"), mode="create")
    for i in range(200):
        _refresh(uri, {f"s3://b/f{i}": (str(i), None)}, [])
    started = time.perf_counter()
    walk = progress.walk_units(lance.dataset(uri))
    print(f"walk of 201 versions: {time.perf_counter() - started:.3f} s")
    assert len(walk.done) == 201 and walk.deltas == 200
