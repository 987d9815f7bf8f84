"""``./dev gpu-check --smoke`` on the CPU (not marked gpu: the default suite runs it, so the
GPU check cannot rot), with Ray, Lance and s3fs made unimportable as on the GPU machines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedjob.bench import gpu_check

REPO = Path(__file__).resolve().parents[2]
# What the bare GPU machines lack (BENCHMARKS.md "GPU check").
ABSENT_ON_GPU_MACHINES = ("ray", "lance", "lance_ray", "lance_namespace", "pylance", "s3fs")
BLOCKER = """
import sys

class _Absent:
    \"\"\"A meta path finder that refuses the packages a bare GPU machine lacks and writes
    down every attempt (even one that a try/except would swallow).\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {absent!r}:
            with open({log!r}, "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: GPU machine)")
        return None

sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, Path, subprocess.CompletedProcess]:
    """One ``./dev gpu-check --smoke`` run under the blocker (a sitecustomize on PYTHONPATH,
    so the nested pytest of the GPU tier is blocked too)."""
    root = tmp_path_factory.mktemp("gpu-check")
    attempts = root / "blocked.txt"
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER).format(
        absent=set(ABSENT_ON_GPU_MACHINES), log=str(attempts)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": str(site), "EMBEDJOB_VENV": str(Path(sys.executable).parents[1])}
    out = root / "gpu-check.json"
    done = subprocess.run([str(REPO / "dev"), "gpu-check", "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not attempts.exists(), f"imported on the way: {attempts.read_text()}"
    return json.loads(out.read_text()), out, done


def test_the_last_line_is_the_record_written_to_out(smoke) -> None:
    record, out, done = smoke
    assert json.loads(done.stdout.strip().splitlines()[-1]) == record
    assert out.read_text().count("\n") == 1
    assert record["check"] == "gpu-check" and record["smoke"] is True
    assert record["errors"] == {} and record["cut"] == []
    assert record["card"] is None and record["peak_gpu_mem_bytes"] is None  # CPU
    import torch

    assert record["torch"] == torch.__version__ == record["environment"]["torch"]
    assert 0 < record["wall_s"] <= record["budget_s"]


def test_the_gpu_tier_ran_and_skipped_every_test_without_cuda(smoke) -> None:
    tests = smoke[0]["tests"]
    assert tests["rc"] == 0
    # every test of tests/gpu/test_model_gpu.py (parametrized: 10), skipped on the CPU
    assert tests["skipped"] >= 10 and "passed" not in tests and "failed" not in tests


def test_model_only_and_actor_figures_are_consistent(smoke) -> None:
    record = smoke[0]
    model = record["model"]
    assert (model["layers"], model["hidden"]) == (2, 64) and model["varlen"] is True
    assert model["params_nonembedding"] == gpu_check.shape_params(gpu_check.CONFIGS["tiny"])
    names = {"mix_padded", "mix_packed", "fixed512_padded", "fixed512_packed"}
    assert set(record["model_only"]) == names
    for name, got in record["model_only"].items():
        assert got["rows"] == 16 * got["windows"] and got["tokens_per_s"] > 0
        assert got["tokens_per_s"] == pytest.approx(got["tokens"] / got["wall_s"], rel=1e-3)
        assert got["mfu"] is None and got["tflops_per_s"] >= 0  # no peak on a CPU
        assert 0 < got["padding_efficiency"] <= 1
        if name.endswith("packed"):
            assert got["padding_efficiency"] == 1.0
    # the same pooled corpora under both layouts; fixed texts are ~512 tokens
    per_row = {n: g["tokens"] / g["rows"] for n, g in record["model_only"].items()}
    assert per_row["mix_padded"] == per_row["mix_packed"] < 200
    assert 505 <= per_row["fixed512_padded"] == per_row["fixed512_packed"] <= 520
    assert set(record["actor"]) == {"mix_padded", "mix_packed"}
    for name, got in record["actor"].items():
        bound = record["model_only"][name]
        assert got["tokens"] / got["rows"] == per_row[name]
        assert got["vs_model_only"] == pytest.approx(
            got["tokens_per_s"] / bound["tokens_per_s"], abs=1e-3)
        # the actor stores what model-only computes (fp32 on the CPU, the same batches)
        assert got["max_abs_diff_vs_model_only"] < 1e-6


def test_sentence_transformers_matches_the_generic_path_or_says_why_not(smoke) -> None:
    st = smoke[0]["sentence_transformers"]
    if smoke[0]["environment"]["sentence_transformers"] is None:
        assert st == {"skipped": "sentence_transformers is not installed here"}
        return
    assert st["min_cosine_vs_embedjob"] > 0.9999  # fp32 on the CPU: the same vectors
    for bs in gpu_check.ST_BATCH_SIZES:
        # the same texts (each slot runs as many whole windows as fit: compare per row)
        ours, theirs = st["embedjob_generic_padded"], st[f"batch_{bs}"]
        assert theirs["tokens"] / theirs["rows"] == ours["tokens"] / ours["rows"]
        ratio = st["embedjob_generic_padded"]["tokens_per_s"] / st[f"batch_{bs}"]["tokens_per_s"]
        assert st[f"ratio_embedjob_vs_batch_{bs}"] == pytest.approx(ratio, abs=1e-3)


def test_the_budget_shrinks_slots_then_cuts_and_says_so() -> None:
    budget = gpu_check.Budget(100.0)
    assert budget.slot("a", 10.0, 1.0, measurements_left=4, reserve_s=0.0) == 10.0
    assert budget.slot("b", 10.0, 1.0, measurements_left=20, reserve_s=0.0) < 5.01
    assert budget.slot("c", 10.0, 1.0, measurements_left=1, reserve_s=99.5) == 0.0
    assert budget.cut[0].startswith("b: 5.0 s instead of 10.0 s")
    assert budget.cut[1].startswith("c: not run")


def test_run_for_stops_at_its_slot_after_whole_windows() -> None:
    window = gpu_check.Window(ids=[], texts=[], padded=[], packed=[])
    calls = []
    timed = gpu_check.run_for(0.0, [window], calls.append, "cpu")
    assert len(calls) == 1 and timed.windows == [window]  # at least one window


@pytest.mark.parametrize(("argv", "message"), [
    (["--budget-s", "30"], "--budget-s 30: must be >= 60 (> 0 with --smoke)"),
    (["--smoke", "--budget-s", "0"], "--budget-s 0: must be >= 60 (> 0 with --smoke)"),
    (["--peak-tflops", "-1"], "--peak-tflops -1: must be > 0"),
])
def test_bad_flags_exit_with_one_line_naming_the_flag(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
