"""The encode actor's memory stays bounded by the model plus a few blocks, however many
blocks it has embedded (issue #21).

The production ``EncodeActor`` class is driven directly in this process, block after block of
the same bucketed shape mix (long-tailed lengths, as a real corpus), so its private memory
(``RssAnon``) can be read exactly between blocks; in a Ray run the same class runs in the actor
process. Without ``release_free_heap`` a 512-row version of this loop measured +79 MiB over
blocks 3..11, still climbing; with it about +10 MiB, levelling off.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedjob.schema import Status, status_array, token_ids_array
from embedjob.stages import encode
from embedjob.stages.bucket import BucketSpec, bucket_window
from embedjob.stages.encode import EncodeActor, EncodeSpec

pytestmark = pytest.mark.pipeline

BLOCKS, ROWS = 10, 384
WARM_BLOCKS = 3  # the allocator's working set settles over the first blocks
MARGIN_MIB = 20  # growth allowed from block WARM_BLOCKS to the last (with the trim ~+10;
# without it this loop measured +36, 406 -> 459 MiB, still climbing)


def _rss_anon_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _block(k: int, rng: np.random.Generator, vocab: int) -> pa.Table:
    """One bucketed window: lognormal lengths (median 200 tokens, up to 4000)."""
    lengths = np.clip(rng.lognormal(np.log(200), 1.0, ROWS), 4, 4000).astype(np.int32)
    ids = [rng.integers(5, vocab, n).astype(np.int32) for n in lengths]
    table = pa.table({
        "_id": pa.array(np.arange(k * ROWS, (k + 1) * ROWS)),
        "_source": pa.array([f"f{k}.parquet"] * ROWS), "_row": pa.array(np.arange(ROWS)),
        "_status": status_array([Status.EMBED] * ROWS), "_reason": pa.nulls(ROWS, pa.string()),
        "input_ids": token_ids_array(ids), "n_tokens": pa.array(lengths),
        "truncated": pa.array(np.zeros(ROWS, bool)), "content_hash": pa.array(["h"] * ROWS),
        "_changed": pa.array(np.zeros(ROWS, bool)),
    })
    return bucket_window(table, spec=BucketSpec(max_tokens=16384, overhead_tokens=0))


@pytest.mark.slow  # 30 s in CI; benchmarks/ and BENCHMARKS.md (issue #21) measure the same
@pytest.mark.skipif(encode._malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_encode_actor_memory_levels_off_across_blocks(golden_dir):
    actor = EncodeActor(EncodeSpec(model=str(golden_dir), task="retrieval.passage", dims=(32,)))
    rng = np.random.default_rng(0)
    vocab = actor.embedder.model.get_input_embeddings().weight.shape[0]
    seen = []
    for k in range(BLOCKS):
        out = actor(_block(k, rng, vocab))
        assert out.num_rows == ROWS and out.column("vector").null_count == 0
        del out
        seen.append(_rss_anon_mib())
    growth = seen[-1] - seen[WARM_BLOCKS - 1]
    assert growth <= MARGIN_MIB, f"RssAnon per block (MiB): {[round(x) for x in seen]}"
