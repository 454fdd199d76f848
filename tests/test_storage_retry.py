"""The retry helper for storage operations: transient errors are retried with growing waits for a time budget,
others not at all."""
from __future__ import annotations

import logging

import pytest

from storage.retry import RETRY_BUDGET_ENV, is_transient, retry_budget, with_retries


class Flaky:
    """Fails ``failures`` times with ``error``, then returns "done"."""

    def __init__(self, failures: int, error: BaseException):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


class Clock:
    """A fake monotonic clock that only `sleep` moves (so budgets are tested without waiting)."""

    def __init__(self):
        self.now, self.waits = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


SLOW_DOWN = OSError("When uploading object with key 'p.parquet' in bucket 'b': AWS Error SLOW_DOWN during "
                    "PutObject operation: Please reduce your request rate.")
REFUSED = OSError("When listing objects under key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                  "ListObjectsV2 operation: curlCode: 7, Couldn't connect to server")


def test_fails_twice_then_succeeds_with_growing_waits():
    clock = Clock()
    call = Flaky(2, SLOW_DOWN)
    assert with_retries(call, base_delay=0.1, sleep=clock.sleep, clock=clock) == "done"
    assert call.calls == 3 and len(clock.waits) == 2
    # Waits double from one attempt to the next, each scaled by a random factor in [0.5, 1].
    assert 0.05 <= clock.waits[0] <= 0.1 and 0.1 <= clock.waits[1] <= 0.2


def test_keeps_trying_for_the_whole_budget_then_gives_up_with_a_note(caplog):
    clock = Clock()
    call = Flaky(10 ** 6, REFUSED)
    with caplog.at_level(logging.WARNING, logger="fragile.storage"), pytest.raises(OSError) as info:
        with_retries(call, op="list", uri="s3://b/x", budget=60, base_delay=1.0, max_delay=8.0,
                     sleep=clock.sleep, clock=clock)
    assert sum(clock.waits) == pytest.approx(60.0)  # the last wait is cut to what is left of the budget
    assert max(clock.waits) <= 8.0 and len(clock.waits) >= 8
    assert call.calls == len(clock.waits) + 1
    note = " ".join(info.value.__notes__)
    assert "gave up on list s3://b/x" in note and RETRY_BUDGET_ENV in note
    # one log line per retry, naming the operation and the URI
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(clock.waits) and all("list s3://b/x" in line for line in lines)


def test_attempts_cap_the_tries_within_the_budget():
    clock = Clock()
    call = Flaky(10, ConnectionResetError("connection reset by peer"))
    with pytest.raises(ConnectionResetError):
        with_retries(call, attempts=4, base_delay=1.0, max_delay=2.0, sleep=clock.sleep, clock=clock)
    assert call.calls == 4 and len(clock.waits) == 3


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(RETRY_BUDGET_ENV, raising=False)
    assert retry_budget() == 120.0
    monkeypatch.setenv(RETRY_BUDGET_ENV, "7.5")
    assert retry_budget() == 7.5
    clock = Clock()
    with pytest.raises(OSError):
        with_retries(Flaky(10 ** 6, REFUSED), sleep=clock.sleep, clock=clock)
    assert sum(clock.waits) == pytest.approx(7.5)
    monkeypatch.setenv(RETRY_BUDGET_ENV, "soon")
    with pytest.raises(ValueError, match=RETRY_BUDGET_ENV):
        retry_budget()


@pytest.mark.parametrize("error", [
    FileNotFoundError("no such file"),
    PermissionError("read-only"),
    OSError("When reading information for key 'x' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
            "operation: No response body."),
    OSError("AWS Error INVALID_ACCESS_KEY_ID during PutObject operation: key not found"),
    OSError("AWS Error SIGNATURE_DOES_NOT_MATCH during PutObject operation: check your key"),
    OSError("AWS Error NO_SUCH_BUCKET during PutObject operation: The specified bucket does not exist"),
    OSError("AWS Error UNKNOWN (HTTP status 400) during GetObject operation: bad request"),
    ValueError("a bug, not the network"),
])
def test_permanent_errors_are_raised_at_once(error):
    clock = Clock()
    call = Flaky(1, error)
    with pytest.raises(type(error)):
        with_retries(call, sleep=clock.sleep, clock=clock)
    assert call.calls == 1 and clock.waits == []
    assert not is_transient(error)


@pytest.mark.parametrize("error", [
    SLOW_DOWN,
    REFUSED,
    OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 56, Failure when receiving "
            "data from the peer"),
    OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation: please retry"),
    OSError("AWS Error INTERNAL_FAILURE during PutObject operation: We encountered an internal error"),
    OSError("AWS Error UNKNOWN (HTTP status 503) during PutObject operation: Service Unavailable"),
    OSError("AWS Error UNKNOWN (HTTP status 500) during ListObjectsV2 operation: oops"),
    ConnectionResetError("connection reset by peer"),
    TimeoutError("timed out"),
])
def test_transient_errors_are_recognised(error):
    assert is_transient(error)
    assert with_retries(Flaky(1, error), sleep=lambda _: None) == "done"


def test_a_wrapped_transient_error_is_still_transient():
    """Task bodies re-raise with the task key; the cause decides whether Ray runs the task again."""
    try:
        try:
            raise REFUSED
        except OSError as cause:
            raise RuntimeError("task retrain/abc/retrain-00000 failed") from cause
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(RuntimeError("task failed")) and not is_transient(None)


def test_attempts_must_be_positive():
    with pytest.raises(ValueError, match="attempts"):
        with_retries(lambda: 1, attempts=0)
