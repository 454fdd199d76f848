"""Retrying storage operations that fail for a while: a reset connection, a 5xx answer, S3's SlowDown, a
server that is restarting.

Only failures that another attempt can fix are retried. A missing file, a refused key or a missing bucket
fails the same way every time, so it is raised at once: retrying would only delay the message that says
what to fix. ``pyarrow.fs`` reports S3 failures as ``OSError`` whose text names the AWS error
("AWS Error SLOW_DOWN during PutObject operation: ..."), which is what ``is_transient`` reads.

How long to keep trying is a time budget, not a number of attempts: a store that is gone for a minute (a
restarted server, a network blip) should cost a minute, not the run. The budget is
``FRAGILE_STORE_RETRY_S`` seconds (default 120) per operation, waits grow exponentially with jitter, and
every retry is logged once, naming the operation and the URI, on the ``fragile.storage`` logger.
"""
from __future__ import annotations

import logging
import os
import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["is_transient", "with_retries", "retry_budget", "env_seconds", "SettingError", "RETRY_BUDGET_ENV",
           "DEFAULT_BUDGET_S"]

T = TypeVar("T")
log = logging.getLogger("fragile.storage")

RETRY_BUDGET_ENV = "FRAGILE_STORE_RETRY_S"
DEFAULT_BUDGET_S = 120.0

# AWS error names (as pyarrow prints them) that mean "try again": throttling, server trouble, network.
_TRANSIENT_AWS = ("NETWORK_CONNECTION", "SLOW_DOWN", "THROTTLING", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                  "REQUEST_TIMEOUT", "REQUEST_TIME_TOO_SKEWED")
_TRANSIENT = re.compile(rf"AWS Error (?:{'|'.join(_TRANSIENT_AWS)})\b|HTTP status 5\d\d\b|curlCode: (?:7|28|52|55|56)\b")
# Errors that say something about the request, never about the moment (FileNotFoundError is an OSError too).
_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or the error it was raised from) may go away on its own: a lost connection, a
    timeout, a 5xx, throttling."""
    seen = 0
    while exc is not None and seen < 8:  # follow "raise ... from" chains a few links deep
        if isinstance(exc, _PERMANENT):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):  # ConnectionResetError, BrokenPipeError, ...
            return True
        if isinstance(exc, OSError) and _TRANSIENT.search(str(exc)) is not None:
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


class SettingError(ValueError):
    """An environment variable of the storage layer set to something that is not a duration."""


def env_seconds(name: str, default: float) -> float:
    """A duration in seconds from the environment variable `name` (unset or empty: `default`)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number of seconds") from None
    if not value >= 0:
        raise SettingError(f"{name}={raw!r} must be >= 0 seconds")
    return value


def retry_budget() -> float:
    """Seconds one storage operation may keep retrying (``FRAGILE_STORE_RETRY_S``, default 120)."""
    return env_seconds(RETRY_BUDGET_ENV, DEFAULT_BUDGET_S)


def with_retries(call: Callable[[], T], *, op: str = "storage operation", uri: str = "",
                 budget: float | None = None, base_delay: float = 0.2, max_delay: float = 10.0,
                 attempts: int | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> T:
    """``call()``, tried again while it fails with a transient error (see ``is_transient``) and the time
    budget lasts (``budget`` seconds, default ``retry_budget()``; ``attempts`` caps the tries as well).

    Before retry k it waits about ``base_delay * 2**(k-1)`` seconds (at most ``max_delay``), scaled by a random
    factor in [0.5, 1] so that many workers throttled together do not come back together; the last wait is
    cut to what is left of the budget. Each retry is logged once with ``op`` and ``uri``. Any other error,
    and the last transient one, is raised unchanged (same type, so callers can still tell them apart).
    """
    if attempts is not None and attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    budget = retry_budget() if budget is None else budget
    deadline = clock() + budget
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - clock()
            if left <= 0 or (attempts is not None and attempt >= attempts):
                exc.add_note(f"gave up on {op} {uri} after {attempt} attempt(s) in {budget:g} s of retries "
                             f"(transient storage error; {RETRY_BUDGET_ENV} sets the budget)")
                raise
            wait = min(left, min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
            log.warning("store: %s %s failed (%s); retry %d in %.1f s, %.0f s of the retry budget left",
                        op, uri, _first_line(exc), attempt, wait, left)
        sleep(wait)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
