"""A bad configuration fails before any model loads, naming the value and what is allowed."""

from __future__ import annotations

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjob.config import EmbedConfig
from embedjob.driver import pipeline
from embedjob.driver.run import run
from embedjob.errors import (
    ConfigError,
    InputError,
    OutputExistsError,
    StorageError,
    UnknownTaskError,
    UnsupportedDimError,
)
from tests.pipeline_helpers import real_rows, to_table

pytestmark = pytest.mark.pipeline


@pytest.fixture
def no_model_load(monkeypatch):
    """Building the pipeline (where actors load the model) is an error in these tests."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the pipeline was built: preflight let a bad config through")

    monkeypatch.setattr(pipeline, "build", refuse)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(to_table(real_rows(3)), path)
    return path


def _config(corpus, tmp_path, golden_dir, **kwargs):
    values = {"input": str(corpus), "output": str(tmp_path / "o.lance"), "model": str(golden_dir)}
    return EmbedConfig(**(values | kwargs))


def test_unknown_task_lists_valid_tasks(corpus, tmp_path, golden_dir, no_model_load):
    with pytest.raises(UnknownTaskError, match=r"'retreival.query'.*'retrieval.query'"):
        run(_config(corpus, tmp_path, golden_dir, task="retreival.query"))


def test_dim_not_offered_lists_dims(corpus, tmp_path, golden_dir, no_model_load):
    with pytest.raises(UnsupportedDimError, match=r"100.*\[8, 16, 32, 64\]"):
        run(_config(corpus, tmp_path, golden_dir, dims=(64, 100)))


def test_missing_input(tmp_path, golden_dir, no_model_load):
    with pytest.raises(InputError, match=r"input '.*nowhere.parquet' matched no parquet files"):
        run(_config(tmp_path / "nowhere.parquet", tmp_path, golden_dir))


def test_empty_input_directory(tmp_path, golden_dir, no_model_load):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"matched no parquet files"):
        run(_config(tmp_path / "empty", tmp_path, golden_dir, format="parquet"))


def test_missing_text_column_lists_columns(corpus, tmp_path, golden_dir, no_model_load):
    with pytest.raises(ConfigError,
                       match=r"--text-column 'body' not in .*\['id', 'text', 'lang'\]"):
        run(_config(corpus, tmp_path, golden_dir, text_column="body"))


def test_output_exists_in_create_mode(corpus, tmp_path, golden_dir, no_model_load):
    lance.write_dataset(pa.table({"x": [1]}), tmp_path / "o.lance")
    with pytest.raises(OutputExistsError, match=r"already exists and mode is 'create'"):
        run(_config(corpus, tmp_path, golden_dir))


def test_unreachable_endpoint(corpus, tmp_path, golden_dir, no_model_load):
    options = {"aws_endpoint": "http://127.0.0.1:9", "aws_access_key_id": "k",
               "aws_secret_access_key": "never-shown", "allow_http": "true",
               "aws_region": "us-east-1"}
    with pytest.raises(StorageError, match=r"127.0.0.1:9") as info:
        run(_config(corpus, tmp_path, golden_dir, output="s3://bucket-x/o.lance",
                    storage_options=options))
    assert "never-shown" not in str(info.value)


def test_missing_bucket(corpus, tmp_path, golden_dir, s3_server, no_model_load):
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' .* does not exist"):
        run(_config(corpus, tmp_path, golden_dir, output="s3://no-such-bucket/o.lance",
                    storage_options=s3_server.storage_options))
