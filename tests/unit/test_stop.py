"""Graceful stop's signal handling (``driver/stop.py``) in this process: a signal interrupts
only the wait for results; elsewhere it is noted and raised at the next safe point."""

from __future__ import annotations

import os
import signal
import time

import pytest

from embedjob.driver.stop import StopRequested, stop_on_signal

pytestmark = pytest.mark.unit


def test_a_signal_while_waiting_interrupts_the_wait_with_its_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signal() as stop, pytest.raises(StopRequested) as raised, stop.waiting():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted long before this ends
        pytest.fail("the wait was not interrupted")
    assert raised.value.exit_code == 143 and str(raised.value) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_a_signal_outside_the_wait_is_noted_and_raised_at_the_next_safe_point():
    with stop_on_signal() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # e.g. during a commit: not cut in half
        for _ in range(50):
            time.sleep(0.01)
        assert stop.signum == signal.SIGINT
        with pytest.raises(StopRequested) as raised, stop.waiting():
            pytest.fail("a pending stop must not start another wait")
        assert raised.value.exit_code == 130
