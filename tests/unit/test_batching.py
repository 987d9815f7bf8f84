"""Token-budget batching: named boundary cases and invariants of the pure planner."""

import numpy as np
import pyarrow as pa
import pytest

from embedjob.stages.batching import padding_efficiency, plan_batches
from embedjob.stages.bucket import BucketSpec, bucket_window
from embedjob.stages.vectors import batch_runs

pytestmark = pytest.mark.unit


def _costs(lengths, batches, padded=True):
    return [
        (len(b) * max(lengths[i] for i in b)) if padded else sum(lengths[i] for i in b)
        for b in batches
    ]


def test_batch_exactly_at_budget_stays_whole():
    # 4 rows x 25 tokens = 100 = budget
    assert plan_batches([25, 25, 25, 25], 100) == [range(0, 4)]


def test_one_token_over_budget_starts_a_new_batch():
    # 4 rows, longest 26 -> 104 > 100: the fourth row goes to the next batch
    assert plan_batches([25, 25, 25, 26], 100) == [range(0, 3), range(3, 4)]


def test_text_over_budget_goes_alone():
    # [10,10] + [20] processes 40 tokens, [10,10,20] 60: two batches win despite overhead
    assert plan_batches([10, 10, 20, 500], 100) == [range(0, 2), range(2, 3), range(3, 4)]
    assert plan_batches([500], 100) == [range(0, 1)]
    # unsorted rows are cut greedily, the long one still alone
    assert plan_batches([10, 10, 500, 20], 100) == [range(0, 2), range(2, 3), range(3, 4)]


def test_padded_cuts_beat_greedy_at_a_length_jump():
    # greedy fills [1,1,1,1,1,10] (6 x 10 = 60) then [10,10,10]; cutting at the jump
    # costs 5 + 40 tokens instead of 60 + 30
    lengths = [1, 1, 1, 1, 1, 10, 10, 10, 10]
    assert plan_batches(lengths, 60, overhead_tokens=0) == [range(0, 5), range(5, 9)]
    assert plan_batches(lengths, 60, overhead_tokens=0) != plan_batches(lengths[::-1], 60)[::-1]


def test_overhead_keeps_equal_lengths_together():
    # without overhead, any split of equal lengths is optimal; with it, one batch
    assert plan_batches([7] * 8, 100, overhead_tokens=10) == [range(0, 8)]


def test_packed_cost_is_sum_of_lengths():
    lengths = [30, 30, 40, 60]
    assert plan_batches(lengths, 100, padded=False) == [range(0, 3), range(3, 4)]
    # padded: 3 x 40 = 120 and 2 x 60 = 120 both exceed 100
    assert plan_batches(lengths, 100, padded=True) == [range(0, 2), range(2, 3), range(3, 4)]


def test_empty_window():
    assert plan_batches([], 100) == []


@pytest.mark.parametrize("padded", [True, False])
def test_random_plans_cover_rows_once_and_respect_budget(padded):
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 300, rng.integers(1, 200)).tolist()
        if rng.random() < 0.7:
            lengths = sorted(lengths)
        budget = int(rng.integers(50, 2000))
        batches = plan_batches(lengths, budget, padded)
        covered = [i for b in batches for i in b]
        assert covered == list(range(len(lengths)))
        for batch, cost in zip(batches, _costs(lengths, batches, padded), strict=True):
            assert cost <= budget or len(batch) == 1


def test_padding_efficiency_value():
    lengths = np.array([2, 4, 4, 8])
    batches = [range(0, 2), range(2, 4)]
    # real 18; processed 2*4 + 2*8 = 24
    assert padding_efficiency(lengths, batches) == pytest.approx(18 / 24)
    assert padding_efficiency(lengths, batches, padded=False) == 1.0


def _window(lengths, rejected=(), source="a.parquet"):
    n = len(lengths)
    return pa.table({
        "_source": pa.array([source] * n),
        "_row": pa.array(range(n), pa.int64()),
        "_id": pa.array(range(n)),
        "_status": pa.array([1 if i in rejected else 0 for i in range(n)], pa.int8()),
        "_reason": pa.array(["bad" if i in rejected else None for i in range(n)], pa.string()),
        "n_tokens": pa.array(lengths, pa.int32()),
    })


def test_bucket_sorts_window_and_marks_batches():
    out = bucket_window(_window([9, 3, 5, 3, 7], rejected={2}), spec=BucketSpec(max_tokens=16))
    assert out.column("_id").to_pylist() == [1, 3, 4, 0, 2]
    # sorted lengths 3,3,7,9: [3,3] cost 6, 7 alone (3x7 = 21 > 16), 9 alone; rejected -1
    batch = out.column("_batch").to_numpy()
    assert (batch[:4] & 0xFFFFF).tolist() == [0, 0, 1, 2] and batch[4] == -1
    assert len({b >> 20 for b in batch[:4].tolist()}) == 1  # one window key
    assert [list(r) for r in batch_runs(out.column("_batch").to_numpy())] == [[0, 1], [2], [3]]


def test_window_of_one_row():
    out = bucket_window(_window([42]), spec=BucketSpec(max_tokens=10))
    assert out.column("_batch").to_numpy()[0] & 0xFFFFF == 0


def test_two_windows_concatenated_keep_their_batches_apart():
    first = bucket_window(_window([5, 5]), spec=BucketSpec(max_tokens=100))
    second = bucket_window(_window([5, 5], source="b.parquet"), spec=BucketSpec(max_tokens=100))
    runs = batch_runs(pa.concat_tables([first, second]).column("_batch").to_numpy())
    assert [list(r) for r in runs] == [[0, 1], [2, 3]]
