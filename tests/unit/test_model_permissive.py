"""bge-m3, multilingual-e5-large and snowflake-arctic-embed-l-v2.0 layouts (tiny random
weights, tests/model_layouts.py) give sentence-transformers' own vectors, prompts by name."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentence_transformers as st

from embedjob.errors import UnknownTaskError
from embedjob.model import load_embedder, load_spec
from tests.model_fixtures import ATOL_VECTORS, max_err
from tests.model_layouts import LAYOUTS, write_layout

pytestmark = pytest.mark.unit

UDHR = Path(__file__).parents[2] / "embedjob" / "data" / "udhr_sample.parquet"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Short texts in several scripts and one of ~1,500 tokens (over e5's 512)."""
    udhr = pq.read_table(UDHR, columns=["text"]).column("text").to_pylist()
    return ["Hello world", "Ein Mann isst Brot.", "日本語の文", "x", udhr[0],
            "\n".join(udhr[:40])]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_dir(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, write_layout(name, tmp_path_factory.mktemp(name) / "model")


def test_spec_reads_the_layout(layout_dir: tuple[str, Path]) -> None:
    name, d = layout_dir
    layout = LAYOUTS[name]
    spec = load_spec(str(d))
    aliases = {"query": "retrieval.query", "passage": "retrieval.passage"}
    assert (spec.kind, spec.pooling, spec.max_tokens, spec.hidden_size) == (
        "generic", layout.pooling, layout.max_seq_length, 32)
    assert spec.tasks == (*layout.prompts, *(aliases[p] for p in layout.prompts))
    assert {t: spec.prefix(t) for t in layout.prompts} == layout.prompts
    assert spec.default_task is None
    assert [s.kind for s in spec.head.steps] == ["normalize"]
    assert spec.license == layout.license and not spec.non_commercial


def test_vectors_equal_sentence_transformers(layout_dir: tuple[str, Path],
                                             texts: list[str]) -> None:
    name, d = layout_dir
    reference = st.SentenceTransformer(str(d), device="cpu", local_files_only=True)
    emb = load_embedder(str(d), device="cpu")
    tokenized = emb.tokenizer.tokenize(texts)
    assert tokenized.truncated.tolist() == [False] * 5 + [name == "e5"]
    for prompt in (None, *LAYOUTS[name].prompts):
        want = reference.encode(texts, prompt_name=prompt, normalize_embeddings=True,
                                convert_to_numpy=True, batch_size=3)
        assert max_err(emb.encode(texts, prompt_name=prompt), want) < ATOL_VECTORS
        ids = emb.tokenizer.tokenize(texts, prompt).ids
        assert max_err(emb.encode_ids(ids, task=prompt, packed=True), want) < ATOL_VECTORS
        if prompt is not None:
            alias = {"query": "retrieval.query", "passage": "retrieval.passage"}[prompt]
            assert max_err(emb.encode(texts, task=alias), want) < ATOL_VECTORS
    # normalize=False: as the model's last module leaves them (here its Normalize module)
    want_raw = reference.encode(texts[:2], convert_to_numpy=True)
    assert max_err(emb.encode(texts[:2], normalize=False), want_raw) < ATOL_VECTORS
    with pytest.raises(UnknownTaskError, match=r"task 'document' not"):
        emb.encode(["x"], prompt_name="document")


def test_prompt_name_chooses_the_task_of_a_run(layout_dir: tuple[str, Path]) -> None:
    from embedjob.config import EmbedConfig
    from embedjob.driver.preflight import _stamp, _task
    from embedjob.errors import ConfigError
    from embedjob.table.search import read_stamp

    name, d = layout_dir
    spec = load_spec(str(d))

    def config(**kw) -> EmbedConfig:
        return EmbedConfig(input="in.parquet", output="out.lance", model=str(d), **kw)

    assert _task(config(), spec) is None
    for prompt, text in LAYOUTS[name].prompts.items():
        assert _task(config(prompt_name=prompt), spec) == prompt
        stamp = _stamp(config(prompt_name=prompt), spec, prompt, (32,))
        assert (stamp["embedjob.task"], stamp["embedjob.instruction"]) == (prompt, text)
        assert read_stamp(pa.schema([], metadata=stamp)).query_task == "query"
    with pytest.raises(ConfigError, match=r"--prompt-name 'document' not in the model's "
                                          r"prompts \["):
        _task(config(prompt_name="document"), spec)


def test_revision_goes_with_hub_ids_only(tmp_path: Path) -> None:
    from embedjob.config import EmbedConfig
    from embedjob.errors import ConfigError

    def config(**kw) -> EmbedConfig:
        return EmbedConfig(input="in.parquet", output="out.lance", **kw)

    assert config(model="BAAI/bge-m3", revision="refs/pr/5").model == "BAAI/bge-m3@refs/pr/5"
    assert config(model="BAAI/bge-m3@abc", revision="abc").model == "BAAI/bge-m3@abc"
    with pytest.raises(ConfigError, match=r"--revision 'abc': --model .* is not a hub id"):
        config(model=str(tmp_path), revision="abc")
    with pytest.raises(ConfigError, match=r"--revision 'abc' differs"):
        config(model="BAAI/bge-m3@def", revision="abc")


def test_licence_read_from_card_or_config(tmp_path: Path) -> None:
    from embedjob.model.spec import read_license

    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: 'cc-by-nc-4.0'\n---\n"
                                        "license: mit\n")
    assert read_license(tmp_path, {"license": "apache-2.0"}) == "cc-by-nc-4.0"
    (tmp_path / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert read_license(tmp_path, {"license": "apache-2.0"}) == "apache-2.0"
    assert read_license(tmp_path, {}) == "unknown"
