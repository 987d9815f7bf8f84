"""Smoke test of ``benchmarks/scale_bench.py shard`` (the bytes-per-id figures of
BENCHMARKS.md): the shard state is 20 bytes per row and resolving peaks at 36."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from tests.pipeline_helpers import REPO

pytestmark = pytest.mark.unit


def test_shard_series_prints_20_bytes_per_row_and_a_36_byte_peak(capsys):
    script = runpy.run_path(str(REPO / "benchmarks" / "scale_bench.py"), run_name="scale")
    assert script["main"](["shard", "--rows", "200000"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    shard = [r for r in last["runs"] if "numpy_bytes_per_row" in r]
    assert [r["ids"] for r in shard] == ["int64", "string"]
    for r in shard:
        assert r["numpy_bytes_per_row"] == 20.0
        assert 20.0 < r["resolve_peak_bytes_per_row"] <= 37.0
        assert r["losers"] == 10_000 and r["after_bytes_per_row"] == pytest.approx(0.4)


def test_the_sampler_tells_a_workers_private_memory_from_shared_pages(tmp_path):
    """A child titled like a Ray worker holds 64 MiB of its own and touches 96 MiB of shared
    memory (as a worker touches object-store pages): its RSS peak counts both, its private
    peak only the first."""
    import subprocess
    import sys
    import time

    from embedjob.bench.scale import ProcessSampler

    shm = Path("/dev/shm") / f"embedjob-test-{tmp_path.name}"
    child = ("import mmap, os, time\n"
             f"f = open({str(shm)!r}, 'w+b'); f.truncate(96 << 20)\n"
             "m = mmap.mmap(f.fileno(), 96 << 20)\n"
             "for i in range(0, 96 << 20, 4096): m[i] = 1\n"
             "own = bytearray(64 << 20)\n"
             "for i in range(0, 64 << 20, 4096): own[i] = 1\n"
             "print('ready', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen(["ray::Probe", "-c", child], executable=sys.executable,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with ProcessSampler(interval_s=0.1) as sampler:
            time.sleep(0.6)
    finally:
        proc.kill()
        proc.wait()
        shm.unlink(missing_ok=True)
    # other suites' Ray workers may still be alive here: pick the probe out by its pid
    (p,) = [p for p in sampler.largest_processes(top=1000) if p["pid"] == proc.pid]
    assert p["role_at_peak"] == "ray::Probe"
    assert p["peak_mib"] >= 64 + 96
    assert 64 <= p["private_peak_mib"] < 64 + 60   # the interpreter's own pages, not the 96


def test_the_largest_private_worker_is_chosen_by_private_memory_not_rss():
    """The worker with the biggest RSS is not the one with the most memory of its own when
    its RSS is object-store pages: ``largest_private`` names the other, with its private
    peak; ``largest_processes`` still ranks by RSS."""
    from embedjob.bench.scale import ProcessSampler

    sampler = ProcessSampler()
    mib = 2**20
    sampler._track(1, "ray::Encode", 1000 * mib, 100 * mib)   # mostly shared pages
    sampler._track(2, "ray::Tokenize", 500 * mib, 400 * mib)
    sampler._track(2, "ray::Tokenize", 450 * mib, 420 * mib)  # private peaks later than RSS
    assert sampler.largest_private == ("ray::Tokenize", 420 * mib)
    assert [p["pid"] for p in sampler.largest_processes()] == [1, 2]
    assert sampler.largest_processes()[1]["private_peak_mib"] == 420
