"""User errors at the terminal: exit 2, one line naming the flag and what is allowed, a guess
for near misses, no traceback, fast (the configuration is checked before Ray, torch or Lance
is imported). Runtime failures: exit 1, one line, the log file that holds the traceback."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from embedjob import cli

pytestmark = pytest.mark.unit

# Guards only, on the child's CPU seconds (its wall time swings with the load on a shared
# machine): a pure flag error costs ~0.3 s (the interpreter and pyarrow); importing Ray or
# torch before the configuration is checked costs several seconds more.
FAST_CPU_S = 2.0
# A missing table is found by Lance, which is imported for it (~1.5 s).
TABLE_CPU_S = 15.0
HEAVY = ("ray", "torch", "lance", "transformers")


def _cli(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, CPU seconds) of ``embedjob ARGS``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "embedjob", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return done.returncode, done.stdout + done.stderr, cpu_s


def _one_error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert "Traceback" not in out and ".rs:" not in out, out
    return lines[0]


RUN = ["--input", "in.parquet", "--output", "out.lance"]
EVAL = ["--dataset", "longdoc", "--model", "m", "--output-dir", "o"]
FLAG_ERRORS = [
    (["embed"], "--input, --output required"),
    (["plan"], "--input required"),
    (["refresh", "--output", "o.lance"], "--input required"),
    (["embed", *RUN, "--dims", "abc"], "--dims 'abc' must be integers"),
    (["embed", *RUN, "--mode", "creat"],
     "invalid choice: 'creat' (choose from 'create', 'overwrite', 'append') "
     "(did you mean 'create'?)"),
    (["embed", *RUN, "--dimz", "64"], "unrecognized arguments: --dimz 64 (did you mean '--dims'?)"),
    (["embd"], "(did you mean 'embed'?)"),
    (["embed", *RUN, "--text-column", "id"],
     "--id-column 'id' is not allowed; expected a column other than --text-column 'id'"),
    (["embed", *RUN, "--num-actors", "0"],
     "--num-actors '0' is not allowed; expected N (an integer >= 1) or MIN:MAX"),
    (["embed", *RUN, "--num-actors", "8:2"], "--num-actors '8:2' is not allowed; expected N"),
    (["embed", *RUN, "--max-tokens-per-batch", "x"],
     "argument --max-tokens-per-batch: invalid int value: 'x'"),
    (["embed", "--config", "missing.yaml"], "--config file 'missing.yaml' does not exist"),
    (["embed", "--config", "bad_key.yaml"],
     "unknown config keys ['max_tokens'] (did you mean 'max_tokens_per_batch'?)"),
    (["embed", "--config", "not_yaml.yaml"], "is not valid YAML at line"),
    (["search", "t.lance", "a query", "-k", "0"], "-k 0 is not allowed; expected an integer >= 1"),
    (["eval", *EVAL, "--chunk-tokens", "0"],
     "--chunk-tokens 0 is not allowed; expected an integer >= 1"),
    (["eval", *EVAL, "--chunk-overlap", "64"],
     "--chunk-overlap 64 is not allowed; expected an integer >= 0 and < --chunk-tokens 64"),
    (["eval", *EVAL, "--chunk-boundaries", "words"],
     "invalid choice: 'words' (choose from 'tokens', 'sentences')"),
    (["eval", "--dataset", "longdocs", "--model", "m", "--output-dir", "o"],
     "datasets ['longdocs'] must be non-empty names from ['bible-es-en', 'udhr', 'lee', "
     "'longdoc']"),
]


@pytest.mark.parametrize(("args", "wanted"), FLAG_ERRORS, ids=[" ".join(a) for a, _ in FLAG_ERRORS])
def test_flag_errors_exit_2_with_one_line_fast(args, wanted, tmp_path) -> None:
    (tmp_path / "bad_key.yaml").write_text("input: a.parquet\noutput: o.lance\nmax_tokens: 5\n")
    (tmp_path / "not_yaml.yaml").write_text("input: [a\n")
    code, out, took = _cli(args, tmp_path)
    assert code == 2, out
    assert wanted in _one_error_line(out)
    assert took < FAST_CPU_S, f"{took:.2f} s"


@pytest.mark.parametrize("command", ["compact", "info", "search"])
def test_missing_table_is_one_line_with_the_path_intact(command, tmp_path) -> None:
    missing = tmp_path / "missing.lance"
    args = [command, str(missing)] + (["a query"] if command == "search" else [])
    code, out, took = _cli(args, tmp_path)
    assert code == 2, out
    assert _one_error_line(out) == f"embedjob: error: no Lance table at '{missing}'"
    assert not missing.exists()  # compact did not leave a lease behind
    assert took < TABLE_CPU_S


def test_flag_errors_import_nothing_heavy(tmp_path) -> None:
    probe = ("import sys; from embedjob.cli import main\n"
             "code = main(['embed', '--input', 'a.parquet', '--output', 'o.lance', "
             "'--dims', '0'])\n"
             f"print(code, [m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split("\n")[0] == "2 []", done.stdout + done.stderr
    assert "--dims (0,) is not allowed; expected positive integers" in done.stderr


def test_runtime_failure_exits_1_with_one_line_and_the_log(tmp_path, monkeypatch, capsys) -> None:
    def broken(_options) -> None:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setenv(cli.LOG_DIR_ENV, str(tmp_path))
    table = cli.commands()
    table["info"] = cli.Command("info", table["info"].options, broken)
    assert cli.main(["info", "t.lance"], table=table) == 1
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert line.startswith("embedjob: info failed: RuntimeError: disk on fire (details: ")
    log = Path(line.rsplit("(details: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path
    text = log.read_text()
    assert "Traceback" in text and "disk on fire" in text and "second line" in text


def test_version_names_the_key_dependencies(tmp_path) -> None:
    from importlib.metadata import version

    code, out, took = _cli(["--version"], tmp_path)
    assert code == 0
    assert out.startswith(f"embedjob {version('embedjob')} (torch {version('torch')}, "
                          f"ray {version('ray')}, pylance {version('pylance')}")
    assert f"transformers {version('transformers')}" in out
    assert took < FAST_CPU_S
