"""The duplicate-id shard's rule, without Ray: first (source order, row) wins, whatever the
order the rows arrive in; a row sent twice is not its own duplicate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedjob.stages import dedupe
from embedjob.stages.dedupe import ROW_BITS, IdShard, id_keys

pytestmark = pytest.mark.unit


def _order(source: int, row: int) -> int:
    return source << ROW_BITS | row


def _rows(ids: list, orders: list[int]):
    hi, lo = id_keys(pa.array(ids))
    return hi, lo, np.array(orders, np.uint64)


def test_integer_ids_are_their_own_key_and_string_keys_are_stable():
    hi, lo = id_keys(pa.array([0, -1, 7, 2**62], pa.int64()))
    assert hi.tolist() == [0, 2**64 - 1, 7, 2**62] and lo.tolist() == [0, 0, 0, 0]
    a = id_keys(pa.array(["x", "y", "x", "ü"]))
    b = id_keys(pa.array(["ü", "x"]))
    assert a[0][0] == a[0][2] != a[0][1] and (a[0][3], a[1][3]) == (b[0][0], b[1][0])
    assert a[0].dtype == np.uint64 and a[1].dtype == np.uint32


@pytest.mark.parametrize("ids", [[5, 6, 5, 7, 5, 6], ["e", "f", "e", "g", "e", "f"]])
def test_first_row_in_source_order_wins_whatever_the_arrival_order(ids):
    orders = [_order(1, 3), _order(0, 9), _order(0, 2), _order(2, 0), _order(1, 0),
              _order(2, 5)]
    # rows 0, 2, 4 share an id: (0, 2) is first; rows 1, 5 share one: (0, 9) is first
    expected = sorted([_order(1, 3), _order(1, 0), _order(2, 5)])
    rng = np.random.default_rng(0)
    for _ in range(5):
        shard = IdShard([(0, "a"), (1, "b"), (2, "c")])
        perm = rng.permutation(len(ids))
        for part in np.array_split(perm, 3):  # in chunks, as scan tasks send them
            hi, lo, order = _rows([ids[i] for i in part], [orders[i] for i in part])
            shard.add(hi, lo, order)
        parts = shard.resolve(np.zeros(3, np.int64), 1)
        losers, rows, distinct = parts[0], parts[1], parts[2]
        assert losers.tolist() == expected and (rows, distinct) == (6, 3)
        shard.take_losers(losers)
        assert shard.losers("b", 0, 10).tolist() == [0, 3]
        assert shard.losers("b", 1, 3).tolist() == [3]
        assert shard.losers("c", 0, 5).tolist() == [5]
        assert shard.losers("a", 0, 100).tolist() == []
        assert shard.losers("not-mine", 0, 100).tolist() == []
        assert shard.count_losers(np.array([1]), []) == 2
        assert shard.count_losers(np.array([1]), [(1, 0, 1)]) == 1
        assert shard.count_losers(np.array([0, 2]), []) == 1


def test_a_row_sent_twice_by_a_retried_task_is_not_its_own_duplicate():
    shard = IdShard([(0, "a")])
    for _ in range(2):
        shard.add(*_rows([1, 2, 1], [_order(0, 0), _order(0, 1), _order(0, 2)]))
    losers, rows, distinct = shard.resolve(np.zeros(1, np.int64), 1)
    assert losers.tolist() == [_order(0, 2)] and (rows, distinct) == (3, 2)


def test_losers_go_to_the_shard_serving_their_source():
    sources = [f"s3://b/part-{i}.parquet" for i in range(6)]
    serving = np.array([dedupe.source_shard(s, 3) for s in sources], np.int64)
    shard = IdShard([])
    shard.add(*_rows([9] * 6, [_order(i, 0) for i in range(6)]))
    *parts, rows, distinct = shard.resolve(serving, 3)
    got = {int(k) >> ROW_BITS: s for s, part in enumerate(parts) for k in part}
    assert got == {i: int(serving[i]) for i in range(1, 6)} and (rows, distinct) == (6, 1)


def test_state_is_20_bytes_per_row_while_scanning():
    shard = IdShard([])
    n = 10_000
    shard.add(*_rows(list(range(n)), list(range(n))))
    assert shard.nbytes() == 20 * n


def test_an_empty_shard_resolves_to_nothing():
    shard = IdShard([])
    *parts, rows, distinct = shard.resolve(np.zeros(0, np.int64), 2)
    assert [p.tolist() for p in parts] == [[], []] and (rows, distinct) == (0, 0)
