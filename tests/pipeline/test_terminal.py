"""What a person sees of ``embedjob embed``: under a pseudo-terminal a short start block, one
progress bar with the row total, the summary once, where the rejected rows are, no ERROR or
WARNING line from Ray or Lance; piped (even ``--verbose``), no colour codes."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import lance
import pyarrow.parquet as pq
import pytest

from tests.pipeline_helpers import real_rows, to_table

pytestmark = pytest.mark.pipeline

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ROWS, BLANK = 30, 3  # rows written, of which this many have an empty text (rejected)


def _corpus(tmp_path: Path) -> Path:
    rows = real_rows(ROWS)
    for row in rows[:BLANK]:
        row["text"] = "   "
    path = tmp_path / "corpus.parquet"
    pq.write_table(to_table(rows), path)
    return path


def _args(tmp_path: Path, golden_dir: Path) -> list[str]:
    return [sys.executable, "-m", "embedjob", "embed", "--input", str(_corpus(tmp_path)),
            "--output", str(tmp_path / "out.lance"), "--model", str(golden_dir)]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"EMBEDJOB_LOG_DIR": str(tmp_path / "logs"), "COLUMNS": "120"} | extra


def _run_in_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(args, stdin=terminal, stdout=terminal, stderr=terminal, env=env)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return proc.wait(timeout=600), b"".join(chunks).decode("utf-8", "replace")


def _screen(raw: str) -> list[str]:
    """The lines left on the screen: a carriage return redraws its line."""
    lines = [ANSI.sub("", line.split("\r")[-1]) for line in raw.replace("\r\n", "\n").split("\n")]
    return [line for line in lines if line.strip()]


def test_embed_under_a_terminal_is_short_and_quiet(tmp_path, golden_dir) -> None:
    code, raw = _run_in_a_terminal(_args(tmp_path, golden_dir), _env(tmp_path))
    screen = _screen(raw)
    assert code == 0, raw[-3000:]
    assert len(screen) <= 15, "\n".join(screen)
    assert not [line for line in screen if re.search(r"ERROR|WARNING|WARN|Traceback", line)], \
        "\n".join(screen)
    assert screen[0].startswith(f"embedjob embed: 1 parquet input unit(s), {ROWS} rows to read")
    bars = [line for line in screen if line.startswith("[")]
    assert len(bars) == 1 and re.match(rf"\[#{{24}}\] {ROWS}/{ROWS} rows 100% \| [\d,]+ "
                                       rf"tokens/s \| {BLANK} rejected \| 0:\d\d:\d\d elapsed, "
                                       r"ETA 0:00:00$", bars[0]), screen
    summaries = [line for line in screen if line.startswith("embedded ")]
    assert len(summaries) == 1
    assert summaries[0].startswith(f"embedded {ROWS - BLANK}/{ROWS} rows ({BLANK} rejected")
    # one commit, one version: the progress record and the summary ride in that commit
    assert summaries[0].endswith("1 data commits -> " + str(tmp_path / "out.lance")
                                 + " (version 1)")
    rejected = tmp_path / "out.rejected.lance"
    assert f"rejected: {BLANK} rows, with their reasons, in {rejected} (embedjob rejected " \
           f"{tmp_path / 'out.lance'})" in screen
    log = Path(screen[-1].removeprefix("log: "))
    assert log.parent == tmp_path / "logs"
    assert "Started a local Ray instance" in log.read_text()  # Ray's own lines went there
    assert lance.dataset(str(tmp_path / "out.lance")).count_rows() == ROWS - BLANK


@pytest.mark.slow
def test_piped_verbose_output_has_no_colour_codes(tmp_path, golden_dir, ray_session) -> None:
    env = _env(tmp_path, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    proc = subprocess.run([*_args(tmp_path, golden_dir), "--verbose"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert not ANSI.search(out), [line for line in out.splitlines() if ANSI.search(line)][:3]
    assert "INFO embedjob.driver.commit: data commit 1" in out  # verbose: the job's log shown
    assert re.search(rf"^{ROWS}/{ROWS} rows 100% \|", proc.stdout, re.M)  # plain line, no bar
    assert proc.stdout.count(f"embedded {ROWS - BLANK}/{ROWS} rows") == 1
