"""The retry helper for storage operations: transient errors are retried with growing waits, others not."""
from __future__ import annotations

import pytest

from storage.retry import is_transient, with_retries


class Flaky:
    """Fails ``failures`` times with ``error``, then returns "done"."""

    def __init__(self, failures: int, error: BaseException):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


SLOW_DOWN = OSError("When uploading object with key 'p.parquet' in bucket 'b': AWS Error SLOW_DOWN during "
                    "PutObject operation: Please reduce your request rate.")


def test_fails_twice_then_succeeds_with_growing_waits():
    waits: list[float] = []
    call = Flaky(2, SLOW_DOWN)
    assert with_retries(call, base_delay=0.1, sleep=waits.append) == "done"
    assert call.calls == 3 and len(waits) == 2
    # Waits double from one attempt to the next, each scaled by a random factor in [0.5, 1].
    assert 0.05 <= waits[0] <= 0.1 and 0.1 <= waits[1] <= 0.2


def test_gives_up_after_the_last_attempt_with_a_note():
    waits: list[float] = []
    call = Flaky(10, ConnectionResetError("connection reset by peer"))
    with pytest.raises(ConnectionResetError) as info:
        with_retries(call, attempts=4, base_delay=1.0, max_delay=2.0, sleep=waits.append)
    assert call.calls == 4 and len(waits) == 3
    assert max(waits) <= 2.0  # capped
    assert "gave up after 4 attempts" in " ".join(info.value.__notes__)


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
    waits: list[float] = []
    call = Flaky(1, error)
    with pytest.raises(type(error)):
        with_retries(call, sleep=waits.append)
    assert call.calls == 1 and waits == []
    assert not is_transient(error)


@pytest.mark.parametrize("error", [
    SLOW_DOWN,
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


def test_attempts_must_be_positive():
    with pytest.raises(ValueError, match="attempts"):
        with_retries(lambda: 1, attempts=0)
