"""The output lease: one live writer at a time; a crashed writer's lease expires."""

import json
import time
from pathlib import Path

import pytest

from embedjob.driver.lease import Lease, OutputLockedError, lease_uri
from embedjob.storage import Storage

pytestmark = pytest.mark.unit


def test_second_writer_is_refused_until_the_first_releases(tmp_path):
    output = str(tmp_path / "out.lance")
    with Lease(output=output, ttl_s=30, storage=Storage()) as first:
        held = json.loads(Path(lease_uri(output)).read_text())
        assert held["owner"] == first.owner and held["expires_at"] > time.time() + 20
        with pytest.raises(OutputLockedError, match=r"out.lance' is being written by another "
                                                   r"run \(owner " + first.owner):
            Lease(output=output, ttl_s=30, storage=Storage()).__enter__()
    with Lease(output=output, ttl_s=30, storage=Storage()):  # released: free again
        pass


def test_a_crashed_writers_lease_expires(tmp_path):
    output = str(tmp_path / "out.lance")
    crashed = Lease(output=output, ttl_s=1.5, storage=Storage())
    crashed.__enter__()
    crashed._stop.set()  # the process "died": no more renewals, no release
    with pytest.raises(OutputLockedError):
        Lease(output=output, ttl_s=30, storage=Storage()).__enter__()
    time.sleep(1.6)
    with Lease(output=output, ttl_s=30, storage=Storage()):
        pass


def test_a_live_writer_keeps_renewing(tmp_path):
    output = str(tmp_path / "out.lance")
    with Lease(output=output, ttl_s=1.2, storage=Storage()):
        time.sleep(2.0)  # longer than the ttl: renewals keep it live
        with pytest.raises(OutputLockedError):
            Lease(output=output, ttl_s=30, storage=Storage()).__enter__()


def test_the_fence_stops_a_run_whose_renewals_failed_for_a_lifetime(tmp_path, monkeypatch):
    from embedjob.driver.lease import LeaseLostError

    output = str(tmp_path / "out.lance")
    with Lease(output=output, ttl_s=0.9, storage=Storage()) as lease:
        lease.check()  # just acquired: commits may go on

        def unreachable(self):
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject")

        monkeypatch.setattr(Lease, "_write", unreachable)
        time.sleep(0.5)
        lease.check()  # renewals failing, but for less than a lifetime
        time.sleep(0.6)
        with pytest.raises(LeaseLostError, match=r"could not be renewed for 1 s \(its "
                                                 r"lifetime is 0.9 s\).*before the next commit"):
            lease.check()
        monkeypatch.undo()


def test_the_fence_stops_a_run_whose_lease_another_run_took(tmp_path):
    from embedjob.driver.lease import LeaseLostError

    output = str(tmp_path / "out.lance")
    with Lease(output=output, ttl_s=30, storage=Storage()) as lease:
        held = json.loads(Path(lease_uri(output)).read_text())
        Path(lease_uri(output)).write_text(json.dumps(held | {"owner": "intruder"}))
        with pytest.raises(LeaseLostError, match=r"no longer this run's \(owner intruder\)"):
            lease.check()
        Path(lease_uri(output)).write_text(json.dumps(held))

