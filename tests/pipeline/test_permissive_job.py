"""The job over a permissive-model layout (multilingual-e5-large, tiny random weights):
vectors equal sentence-transformers', the named prompt and the licence are stamped, a
non-commercial licence is said, undeclared dims need --allow-any-dims, search pairs the
query prompt; pickle-only weights are refused and converted with convert-weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow.parquet as pq
import pytest
import sentence_transformers as st

from embedjob.errors import CheckpointError
from embedjob.model import load_embedder, load_spec, matryoshka
from tests.model_fixtures import ATOL_VECTORS, max_err
from tests.model_layouts import write_layout
from tests.pipeline_helpers import real_rows, to_table, vectors_by_id

pytestmark = pytest.mark.pipeline



def _embedjob() -> str:
    return str(Path(sys.executable).parent / "embedjob")


@pytest.fixture(scope="module")
def nc_e5(tmp_path_factory) -> Path:
    """The e5 layout with a non-commercial licence in its model card."""
    d = write_layout("e5", tmp_path_factory.mktemp("e5") / "model")
    card = d / "README.md"
    card.write_text(card.read_text().replace("license: mit", "license: cc-by-nc-4.0"))
    return d


def test_embed_with_a_named_prompt_equals_sentence_transformers(
        ray_session, nc_e5: Path, tmp_path: Path) -> None:
    rows = real_rows(8)
    rows.append({"id": 99, "text": "\n".join(r["text"] for r in real_rows(30, 8)),
                 "lang": "mul"})  # over e5's 512 tokens
    pq.write_table(to_table(rows), tmp_path / "in.parquet")
    out = tmp_path / "out.lance"
    base = [_embedjob(), "embed", "--input", str(tmp_path / "in.parquet"), "--output", str(out),
            "--model", str(nc_e5), "--prompt-name", "passage", "--dims", "32,16"]
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2
    assert "dim 16 not in matryoshka dims [32]" in refused.stderr
    assert "--allow-any-dims" in refused.stderr
    proc = subprocess.run(base + ["--allow-any-dims"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "non-commercial" in line]
    assert len(said) == 1 and "licensed cc-by-nc-4.0" in said[0]

    dataset = lance.dataset(str(out))
    meta = {k.decode(): v.decode() for k, v in dataset.schema.metadata.items()}
    assert (meta["embedjob.task"], meta["embedjob.instruction"]) == ("passage", "passage: ")
    assert meta["embedjob.license"] == "cc-by-nc-4.0"
    assert json.loads(meta["embedjob.undeclared_dims"]) == [16]
    table = dataset.to_table()
    got, got16 = vectors_by_id(table), vectors_by_id(table, "vector_16")
    want = st.SentenceTransformer(str(nc_e5), device="cpu", local_files_only=True).encode(
        [r["text"] for r in rows], prompt_name="passage", normalize_embeddings=True)
    ids = [r["id"] for r in rows]
    assert max_err(np.stack([got[i] for i in ids]), want) < ATOL_VECTORS
    assert max_err(np.stack([got16[i] for i in ids]), matryoshka(want, 16)) < ATOL_VECTORS
    flags = dict(zip(table.column("id").to_pylist(), table.column("truncated").to_pylist(),
                     strict=True))
    assert [i for i, t in flags.items() if t] == [99]

    from embedjob.table.info import format_info, table_info
    from embedjob.table.search import search

    assert "licence    cc-by-nc-4.0" in format_info(table_info(str(out)))
    query = rows[3]["text"]
    found = search(str(out), query, column="vector_16", k=3)
    q = st.SentenceTransformer(str(nc_e5), device="cpu", local_files_only=True).encode(
        [query], prompt_name="query", normalize_embeddings=True)[0]
    expected = {i: float(matryoshka(q[None], 16)[0] @ got16[i]) for i in ids}
    best = sorted(expected, key=expected.get, reverse=True)[:3]
    assert found.column("id").to_pylist() == best

    # read back as README shows: Ray Data, and LanceDB with the cosine metric
    assert ray_session.data.read_lance(str(out)).count() == len(rows)
    import lancedb
    hits = (lancedb.connect(str(tmp_path)).open_table("out")
            .search(matryoshka(q[None], 16)[0], vector_column_name="vector_16")
            .distance_type("cosine").limit(3).to_arrow())
    assert hits.column("id").to_pylist() == best
    np.testing.assert_allclose(hits.column("_distance").to_numpy(),
                               [1 - expected[i] for i in best], atol=1e-4)


def test_pickle_only_checkpoint_refused_then_converted(tmp_path: Path) -> None:
    src = write_layout("bge-m3", tmp_path / "bge-m3", weights="pickle")
    with pytest.raises(CheckpointError, match=r"found pickle weights \['colbert_linear\.pt', "
                                              r"'pytorch_model\.bin', 'sparse_linear\.pt'\]") as e:
        load_spec(str(src))
    assert "--revision" in str(e.value) and "embedjob convert-weights SRC DST" in str(e.value)
    dst = tmp_path / "converted"
    proc = subprocess.run([_embedjob(), "convert-weights", str(src), str(dst)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pytorch_model.bin -> model.safetensors" in proc.stdout
    assert (dst / "model.safetensors").is_file() and (dst / "1_Pooling" / "config.json").is_file()
    texts = ["Hello world", "Ein Mann isst Brot.", "日本語の文"]
    want = st.SentenceTransformer(str(src), device="cpu", local_files_only=True).encode(
        texts, normalize_embeddings=True)
    assert max_err(load_embedder(str(dst), device="cpu").encode(texts), want) < ATOL_VECTORS
    again = subprocess.run([_embedjob(), "convert-weights", str(src), str(dst)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "exists" in again.stderr
