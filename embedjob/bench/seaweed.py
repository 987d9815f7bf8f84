"""One way to start and stop SeaweedFS's ``weed mini`` on 127.0.0.1: the S3 server of the test
suite (``tests/conftest.py``) and of the scale benchmark's ``--store s3``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

# weed mini's services, as offsets from a base port (each also opens its gRPC twin +10000)
PORT_OFFSETS = {"master": 0, "volume": 1, "filer": 2, "s3": 3, "admin": 4, "webdav": 5}


def start(weed: str, root: Path, *, base_port: int, access_key: str, secret_key: str
          ) -> tuple[subprocess.Popen, str]:
    """Start ``weed mini`` with its data, credentials and log (``weed.log``) under ``root``.

    Returns:
        The process and the S3 endpoint (``http://127.0.0.1:<port>``); the server may still
        be starting: callers poll it until it answers.
    """
    creds = root / "s3.json"
    creds.write_text(json.dumps({"identities": [{
        "name": "embedjob", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (root / "data").mkdir()
    ports = {name: base_port + offset for name, offset in PORT_OFFSETS.items()}
    cmd = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.config={creds}", *(f"-{name}.port={port}" for name, port in ports.items())]
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    return proc, f"http://127.0.0.1:{ports['s3']}"


def stop(proc: subprocess.Popen) -> None:
    """Terminate, then kill if it has not exited within 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
