"""Retrying storage operations that fail for a moment: a reset connection, a 5xx answer, S3's SlowDown.

Only failures that another attempt can fix are retried. A missing file, a refused key or a missing bucket
fails the same way every time, so it is raised at once: retrying would only delay the message that says
what to fix. ``pyarrow.fs`` reports S3 failures as ``OSError`` whose text names the AWS error
("AWS Error SLOW_DOWN during PutObject operation: ..."), which is what ``is_transient`` reads.
"""
from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["is_transient", "with_retries"]

T = TypeVar("T")

# AWS error names (as pyarrow prints them) that mean "try again": throttling, server trouble, network.
_TRANSIENT_AWS = ("NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                  "REQUEST_TIMEOUT")
_TRANSIENT = re.compile(rf"AWS Error (?:{'|'.join(_TRANSIENT_AWS)})\b|HTTP status 5\d\d\b")
# Errors that say something about the request, never about the moment (FileNotFoundError is an OSError too).
_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may go away on its own: a lost connection, a timeout, a 5xx, throttling."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):  # ConnectionResetError, BrokenPipeError, ...
        return True
    return isinstance(exc, OSError) and _TRANSIENT.search(str(exc)) is not None


def with_retries(call: Callable[[], T], *, attempts: int = 4, base_delay: float = 0.1, max_delay: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, tried up to ``attempts`` times while it fails with a transient error (see ``is_transient``).

    Before attempt k+1 it waits about ``base_delay * 2**(k-1)`` seconds (at most ``max_delay``), scaled by a
    random factor in [0.5, 1] so that many workers throttled together do not come back together. Any other
    error, and the last transient one, is raised unchanged (same type, so callers can still tell them apart).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                exc.add_note(f"gave up after {attempts} attempts (transient storage error)")
                raise
        sleep(min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")  # the loop returns or raises
