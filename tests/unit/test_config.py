"""Config validation: bad values name themselves and what is allowed."""

import pytest

from embedjob.cli import embed_config, main
from embedjob.config import EmbedConfig
from embedjob.errors import ConfigError
from embedjob.storage import Storage, redacted

pytestmark = pytest.mark.unit


def test_unknown_keys_are_rejected_with_the_allowed_list():
    with pytest.raises(ConfigError, match=r"unknown config keys \['max_tokens'\] \(did you mean "
                                          r"'max_tokens_per_batch'\?\); allowed: .*"
                                          r"'max_tokens_per_batch'"):
        EmbedConfig.from_mapping({"input": "a.parquet", "output": "o.lance", "max_tokens": 5})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("mode", "replace", r"--mode 'replace' is not allowed; expected \['create', 'overwrite'"),
        ("mode", "apend", r"--mode 'apend' is not allowed \(did you mean 'append'\?\)"),
        ("vector_dtype", "int8", r"--vector-dtype 'int8' .* \['float32', 'float16'\]"),
        ("format", "xml", r"--format 'xml' .* \['parquet', 'jsonl', 'csv', 'lance'\]"),
        ("max_tokens_per_batch", 0, r"--max-tokens-per-batch 0 .* an integer >= 1"),
        ("gpus_per_actor", -1, r"--gpus-per-actor -1 .* >= 0"),
        ("dims", "64,64", r"--dims \(64, 64\) .* distinct"),
        ("keep_columns", "vector", r"--keep-columns \['vector'\]"),
        ("encoder_crash_retries", 0, r"--encoder-crash-retries 0 .* an integer >= 1"),
        ("actor_resources", "GPU=1", r"--actor-resources 'GPU=1' is not allowed; expected "
                                     r"NAME=AMOUNT .* amount > 0, e\.g\. encode_node=1"),
        ("actor_resources", "encode_node=0", r"--actor-resources 'encode_node=0' is not"),
        ("actor_resources", "encode_node", r"--actor-resources 'encode_node' is not"),
    ],
)
def test_bad_values_name_value_and_allowed(key, value, message):
    with pytest.raises(ConfigError, match=message):
        EmbedConfig.from_mapping({"input": "a.parquet", "output": "o.lance", key: value})


def test_actor_resources_become_rays_resources_argument():
    cfg = EmbedConfig(input="a.parquet", output="o.lance",
                      actor_resources="encode_node=1,fast_disk=0.5")
    assert cfg.actor_resource_amounts == {"encode_node": 1.0, "fast_disk": 0.5}
    assert EmbedConfig(input="a.parquet", output="o.lance").actor_resource_amounts == {}


@pytest.mark.parametrize(("value", "normalized", "actor_range"), [
    (4, 4, (4, 4)), ("4", 4, (4, 4)), ("2:8", "2:8", (2, 8)), (" 1:3 ", "1:3", (1, 3)),
    ("4:4", 4, (4, 4)),
])
def test_num_actors_is_a_count_or_a_min_max_range(value, normalized, actor_range):
    cfg = EmbedConfig(input="a.parquet", output="o.lance", num_actors=value)
    assert (cfg.num_actors, cfg.actor_range, cfg.max_actors) == (
        normalized, actor_range, actor_range[1])


@pytest.mark.parametrize("value", [0, "0", "0:4", "8:2", "2:", ":8", "a", "1:2:3", "2.5",
                                   -1, True, ""])
def test_bad_num_actors_names_both_forms(value):
    with pytest.raises(ConfigError, match=r"^--num-actors .* is not allowed; expected N \(an "
                                          r"integer >= 1\) or MIN:MAX .* e\.g\. 4 or 2:8$"):
        EmbedConfig(input="a.parquet", output="o.lance", num_actors=value)


def test_num_actors_range_from_the_cli_and_yaml(tmp_path):
    import argparse

    path = tmp_path / "job.yaml"
    path.write_text("input: in.jsonl\noutput: out.lance\nnum-actors: '2:8'\n")
    cfg = embed_config(argparse.Namespace(command="embed", yaml_config=str(path)))
    assert cfg.actor_range == (2, 8)
    cfg = embed_config(argparse.Namespace(command="embed", yaml_config=str(path),
                                          num_actors="3"))
    assert cfg.num_actors == 3


def test_yaml_config_and_flags_merge(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: in.jsonl\noutput: out.lance\ndims: [64, 16]\nmax-tokens-per-batch: 99\n"
    )
    import argparse

    args = argparse.Namespace(command="embed", yaml_config=str(path), max_tokens_per_batch=123,
                              storage_options=["aws_region=eu-west-1"])
    cfg = embed_config(args)
    assert (cfg.input, cfg.output, cfg.dims, cfg.max_tokens_per_batch) == (
        "in.jsonl", "out.lance", (64, 16), 123)
    assert cfg.input_format == "jsonl"
    assert cfg.storage_options == {"aws_region": "eu-west-1"}
    assert cfg.rejected_uri == "out.rejected.lance"


def test_yaml_unknown_key_fails_in_cli(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("input: a.parquet\noutput: o.lance\nbatch: 3\n")
    assert main(["embed", "--config", str(path)]) == 2
    assert ("unknown config keys ['batch'] (did you mean 'batch_overhead_tokens'?); allowed:"
            in capsys.readouterr().err)


def test_format_cannot_be_inferred():
    cfg = EmbedConfig(input="data/corpus.txt", output="o.lance")
    with pytest.raises(ConfigError, match=r"cannot infer the format of input 'data/corpus.txt'"):
        _ = cfg.input_format


def test_secrets_are_not_in_repr_or_redacted_options(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    options = Storage.resolve({"aws_region": "x"}).options
    assert options["allow_http"] == "true" and options["aws_region"] == "x"
    shown = str(redacted(options))
    assert "s3cr3t-value" not in shown and "AKIAEXAMPLE" not in shown
    cfg = EmbedConfig(input="a.parquet", output="o.lance", storage_options=options)
    assert "s3cr3t-value" not in repr(cfg)


def test_list_fields_given_as_strings_are_split_and_checked_alike() -> None:
    from embedjob.config import EmbedConfig

    config = EmbedConfig(input="i", output="o", keep_columns="a,b", dims="256,64",
                         quantize="int8")
    assert (config.keep_columns, config.dims) == (("a", "b"), (256, 64))
    assert EmbedConfig(input="i", output="o", dims="256").dims == (256,)
    with pytest.raises(ConfigError, match=r"--dims 'x' must be integers"):
        EmbedConfig(input="i", output="o", dims="x")
