"""``--chunking late`` under the plain path's faults, at the encode stage (no Ray): a forward
that runs out of memory is split in halves, a window that does not fit alone rejects its
whole document; a block whose forward kills the actor goes document by document and a
document that kills it alone is rejected with the plain path's reason. The surviving
documents' chunk vectors equal those of a run without faults."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from embedjob import schema as S
from embedjob.model import load_spec
from embedjob.stages import read
from embedjob.stages.bucket import BucketSpec, bucket_window
from embedjob.stages.chunks import ChunkSpec
from embedjob.stages.crashes import CrashLedger, CrashWatch
from embedjob.stages.encode import EncodeActor, EncodeSpec
from embedjob.stages.tokens import TokenizeSpec, tokenize_batch
from tests.faults.hooks import OOM_ABOVE_TOKENS, FaultyEncodeActor
from tests.model_fixtures import ATOL_VECTORS
from tests.pipeline_helpers import real_rows, to_table

pytestmark = [pytest.mark.unit, pytest.mark.faults]
TASK = "retrieval.passage"
WINDOW = 192  # tokens per macro-window, lead and trail included


def _documents() -> list[dict]:
    """Nine documents within one window, the fifth one of several windows."""
    rows = [r for r in real_rows(60, offset=120) if len(r["text"]) < 400][:9]
    long = " ".join(r["text"] for r in real_rows(8, offset=300))
    rows[4] = {**rows[4], "text": long}
    return rows


def _window_rows(golden_dir, rows: list[dict], max_tokens: int = 4000) -> pa.Table:
    """The encode stage's input for ``rows`` under ``--chunking late``, without Ray."""
    spec = read.ReadSpec(format="parquet", id_column="id", text_column="text",
                         keep_columns=(), id_type=pa.int64(), keep_types=())
    table = read.normalize(to_table(rows), "mem://corpus", 0, spec)
    chunking = ChunkSpec(mode="late", tokens=16, overlap=4, boundaries="tokens", window=WINDOW)
    tokens = tokenize_batch(table, spec=TokenizeSpec(model=load_spec(str(golden_dir)),
                                                     task=TASK, chunking=chunking))
    return bucket_window(tokens, spec=BucketSpec(max_tokens=max_tokens))


def _spec(golden_dir, crashes=None) -> EncodeSpec:
    return EncodeSpec(model=str(golden_dir), task=TASK, dims=(64, 16), chunking="late",
                      crashes=crashes)


def _chunks(out: pa.Table) -> dict[tuple[int, int], np.ndarray]:
    """(document id, chunk) -> the full vector, for the chunk rows written."""
    kept = out.filter(pa.compute.equal(out.column(S.STATUS), int(S.Status.EMBED)))
    vectors = np.asarray(kept.column(S.VECTOR).to_pylist(), np.float32)
    return {(d, c): v for d, c, v in zip(kept.column("_id").to_pylist(),
                                         kept.column(S.CHUNK).to_pylist(), vectors, strict=True)}


def _check_rejected(out: pa.Table, doc_id: int, reason: str) -> None:
    """The document left one rejected row holding its whole share, and no chunk row."""
    mine = out.filter(pa.compute.equal(out.column("_id"), doc_id)).to_pylist()
    assert len(mine) == 1, mine
    assert mine[0][S.STATUS] == S.Status.REJECTED and mine[0][S.REASON] == reason
    assert mine[0][S.DOC_SHARE] == S.DOC_WEIGHT and mine[0][S.VECTOR] is None


def _check_survivors(out: pa.Table, normal: pa.Table, rejected: int) -> None:
    got, want = _chunks(out), _chunks(normal)
    assert set(got) == {k for k in want if k[0] != rejected}
    assert max(np.abs(got[k] - want[k]).max() for k in got) < ATOL_VECTORS
    # every document adds up to its weight: the unit is committed whole
    shares = out.group_by("_id").aggregate([(S.DOC_SHARE, "sum")]).to_pylist()
    assert {r[f"{S.DOC_SHARE}_sum"] for r in shares} == {S.DOC_WEIGHT}


def test_late_out_of_memory_splits_forwards_and_rejects_a_document_that_never_fits(
    golden_dir, monkeypatch
) -> None:
    rows = _documents()
    table = _window_rows(golden_dir, rows)
    lengths = dict(zip(table.column("_id").to_pylist(), table.column(S.N_TOKENS).to_pylist(),
                       strict=False))
    windows = table.column("_id").to_pylist().count(rows[4]["id"])
    assert windows > 1 and lengths[rows[4]["id"]] == WINDOW  # the long one's windows are full
    assert max(n for i, n in lengths.items() if i != rows[4]["id"]) < 180  # fit alone
    normal = EncodeActor(_spec(golden_dir))(table)
    monkeypatch.setenv(OOM_ABOVE_TOKENS, "180")  # a full window never fits, the others do
    out = FaultyEncodeActor(_spec(golden_dir))(table)
    _check_rejected(out, rows[4]["id"], f"out of memory: 1 window of {WINDOW} tokens does "
                                        "not fit")
    _check_survivors(out, normal, rows[4]["id"])
    # each forward that ran held at most the budget (padded: windows x longest)
    assert 0 < out.column(S.PROCESSED_TOKENS).to_numpy().max() <= 180


class _Died(BaseException):
    """The actor's process died mid-forward (not an Exception: nothing catches it)."""


class _PoisonActor(EncodeActor):
    """Dies in every forward that holds one of the poison document's windows."""

    poison: set[bytes] = set()

    def encode_spans(self, ids, spans):
        if any(np.asarray(x, np.int32).tobytes() in self.poison for x in ids):
            raise _Died
        return super().encode_spans(ids, spans)


class _LocalWatch(CrashWatch):
    """The crash watch over an in-process ledger (no Ray)."""

    def start(self, key: str) -> int:
        return self.ledger.start(key)

    def finish(self, key: str) -> None:
        self.ledger.finish(key)


@pytest.mark.parametrize("retries", [1, 2])
def test_late_block_that_kills_the_actor_goes_document_by_document(golden_dir,
                                                                   retries) -> None:
    rows = _documents()
    table = _window_rows(golden_dir, rows)
    normal = EncodeActor(_spec(golden_dir))(table)
    poison = rows[4]["id"]  # the long document: all its windows
    ids = table.column(S.INPUT_IDS).to_pylist()
    _PoisonActor.poison = {np.asarray(x, np.int32).tobytes()
                           for i, x in zip(table.column("_id").to_pylist(), ids, strict=True)
                           if i == poison}
    watch = _LocalWatch(ledger=CrashLedger(), retries=retries)
    actor, deaths = _PoisonActor(_spec(golden_dir, watch)), 0
    for _ in range(10):  # Ray restarts the actor and retries the block
        try:
            out = actor(table)
            break
        except _Died:
            deaths += 1
    assert deaths == 2 * retries  # the whole block `retries` times, then the document alone
    _check_rejected(out, poison, f"crashes the encoder: the encode actor died {retries} "
                                 "times with this row in flight alone")
    _check_survivors(out, normal, poison)
