"""``--num-actors MIN:MAX``: the encode pool starts at MIN actors and Ray Data grows it to MAX
while the actors are busy (real local Ray; the encode stage slowed down by the
ENCODE_DELAY_S hook so that the queue builds up).

The pool size is what Ray Data asked for: encode actors in any state but DEAD (an actor
added under load counts from its creation; it is ALIVE once its model has loaded)."""

from __future__ import annotations

import threading
import time

import lance
import numpy as np
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from tests.faults import hooks as faults
from tests.faults.hooks import FaultyEncodeActor
from tests.pipeline_helpers import vectors_by_id, write_parts

# slow: a minute or more on 2 cores (up to ~7 min under load), and timing-bound by nature;
# `--num-actors MIN:MAX` parsing and the manifests are checked in the default suite
pytestmark = [pytest.mark.pipeline, pytest.mark.faults, pytest.mark.slow]


def _encode_actors(exclude: set[str]) -> dict[str, str]:
    """{actor id: state} of this session's encode actors not in ``exclude`` (GCS actor table)."""
    from ray._private.state import state

    return {a["ActorID"]: a["State"] for a in state.actor_table(None).values()
            if "EncodeActor" in a["ActorClassName"] and a["ActorID"] not in exclude}


class _PoolWatch:
    """Samples the encode actors of a run: the most started at once (any state but DEAD: Ray
    Data's pool size), the most ALIVE at once (model loaded, taking blocks), the first
    pool size seen, and every id that was ALIVE."""

    def __init__(self) -> None:
        self.before = set(_encode_actors(set()))
        self.seen: set[str] = set()
        self.most_alive = self.most_started = 0
        self.first_started: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _PoolWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            actors = _encode_actors(self.before)
            alive = sum(state == "ALIVE" for state in actors.values())
            started = sum(state != "DEAD" for state in actors.values())
            if started and self.first_started is None:
                self.first_started = started
            self.most_alive = max(self.most_alive, alive)
            self.most_started = max(self.most_started, started)
            self.seen |= {a for a, state in actors.items() if state == "ALIVE"}
            time.sleep(0.1)


def test_actor_pool_grows_from_min_to_max_under_load(ray_session, golden_dir, embedder,
                                                     tmp_path):
    rows = write_parts(tmp_path / "in", files=16, rows_per_file=4)  # 16 blocks
    config = EmbedConfig(input=str(tmp_path / "in"), format="parquet",
                         output=str(tmp_path / "out.lance"), model=str(golden_dir),
                         num_actors="1:3", cpus_per_actor=0.25, cpus_per_task=0.25,
                         window_rows=4, write_batch_rows=4)
    with faults.injected(faults.ENCODE_DELAY_S, "1.5"), _PoolWatch() as watch:
        summary = run(config, encoder=FaultyEncodeActor)
    print(f"encode actors: first pool {watch.first_started}, most started at once "
          f"{watch.most_started}, most alive at once {watch.most_alive}, "
          f"distinct alive {len(watch.seen)}")
    assert watch.first_started == 1  # the pool starts at MIN
    assert watch.most_started == 3  # ... and grows to MAX under load, never past it
    # How many of them finish loading the model before the input runs out depends on the
    # machine's load (printed above), so it is not asserted.
    assert summary.rows_embedded == len(rows)
    table = lance.dataset(config.output).to_table()
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]
    got = vectors_by_id(table)
    for r in rows[::13]:
        expected = embedder.encode([r["text"]], task="retrieval.passage")[0]
        assert np.abs(got[r["id"]] - expected).max() < 1e-5
