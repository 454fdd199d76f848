"""One run per experiment at a time: a lease object in the store, renewed while the run lives.

Two runs writing one experiment would race on the same parts and the same statistics. Before it writes
anything, a run takes the lease ``<root>/<experiment>/_lease.json`` (hidden from every listing by its leading
"_"): who holds it (run id, host, pid, start time) and until when. The holder renews it every ``ttl / 3``
seconds; a crashed holder stops renewing, so its lease expires after ``ttl`` seconds and does not block the
experiment for ever. A lease whose holder ran on this host and is no longer alive is stale at once (the
usual case: a killed driver, rerun on the same machine). ``force=True`` takes over a live lease.

S3 has no compare-and-swap that every S3 server offers, so taking a lease is write-then-confirm: a run writes
its lease, waits ``settle`` seconds and reads it back; of two runs that wrote at nearly the same moment,
only the one whose write landed last sees its own id, and the other gives up. The window this leaves is two
runs started within one round trip of each other, both before either wrote.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from .retry import env_seconds
from .uri import Store, StoreError, check_name, delete_file, read_bytes, write_atomic

__all__ = ["LEASE", "LeaseHeld", "Lease", "acquire", "check_free", "read_lease", "TTL_ENV"]

log = logging.getLogger("fragile.storage")

LEASE = "_lease.json"
TTL_ENV = "FRAGILE_LEASE_TTL_S"
DEFAULT_TTL_S = 60.0


class LeaseHeld(StoreError):
    """Another run holds the experiment's lease."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started: float  # unix time
    expires: float  # unix time

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {started}"

    def alive_here(self) -> bool | None:
        """Whether the holder's process is alive: None when it ran on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _path(store: Store, experiment: str) -> str:
    return store.path(check_name("experiment", experiment), LEASE)


def lease_ttl() -> float:
    """Seconds a lease lasts without renewal (``FRAGILE_LEASE_TTL_S``, default 60)."""
    return env_seconds(TTL_ENV, DEFAULT_TTL_S)


def read_lease(store: Store, experiment: str) -> Holder | None:
    """The lease as stored now, or None (absent, or unreadable: a torn or foreign file holds nothing)."""
    raw = read_bytes(store, _path(store, experiment))
    if raw is None:
        return None
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):
        return None


class Lease:
    """A held lease: renewed by a daemon thread until ``release`` (or the process ends)."""

    def __init__(self, store: Store, experiment: str, holder: Holder, ttl: float):
        self.store, self.experiment, self.holder, self.ttl = store, experiment, holder, ttl
        self.lost: Holder | None = None  # set when another run took the lease over (--force)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {experiment}", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.holder = Holder(**{**asdict(self.holder), "expires": time.time() + self.ttl})
        write_atomic(self.store, _path(self.store, self.experiment), json.dumps(asdict(self.holder)).encode())

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = read_lease(self.store, self.experiment)
                if current is not None and current.run_id != self.holder.run_id:
                    self.lost = current
                    log.warning("the lease of experiment %s was taken over by another run (%s); this run no "
                                "longer holds it", self.experiment, current.describe())
                    return
                self._write()
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried at the next tick
                log.warning("could not renew the lease of experiment %s: %s", self.experiment, exc)

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            current = read_lease(self.store, self.experiment)
            if current is not None and current.run_id == self.holder.run_id:
                delete_file(self.store, _path(self.store, self.experiment))
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("could not remove the lease of experiment %s (it expires by itself): %s",
                        self.experiment, exc)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(store: Store, experiment: str, *, force: bool = False) -> None:
    """Raise ``LeaseHeld`` if another live run holds the lease (a read only: a run can say so before it starts
    anything, then ``acquire`` once it is ready to write)."""
    _current(store, experiment, force, lambda message: None)


def _current(store: Store, experiment: str, force: bool, notice) -> Holder | None:
    current = read_lease(store, experiment)
    now = time.time()
    if current is not None:
        alive = current.alive_here()
        live = current.expires > now and alive is not False
        if live and not force:
            left = current.expires - now
            raise LeaseHeld(
                f"experiment {experiment!r} in {store.uri} is being written by another run ({current.describe()}); "
                f"wait for it to finish, or, if that run is gone, rerun in {left:.0f} s when its lease expires "
                f"(or now with --force)")
        if live:
            notice(f"taking over the lease of experiment {experiment} from the run on {current.describe()} (--force)")
        elif alive is False:
            notice(f"the previous run of {experiment} ({current.describe()}) is no longer running; taking over "
                   f"its lease")
        else:
            notice(f"the lease of the previous run of {experiment} ({current.describe()}) has expired; taking it over")
    return current


def acquire(store: Store, experiment: str, *, force: bool = False, ttl: float | None = None,
            settle: float = 0.5, notice=lambda message: None) -> Lease:
    """Take the lease of ``experiment`` or raise ``LeaseHeld`` naming the run that holds it.

    ``notice`` receives a line when a stale or forced lease is taken over (shown to the user)."""
    ttl = lease_ttl() if ttl is None else ttl
    path = _path(store, experiment)
    _current(store, experiment, force, notice)
    now = time.time()
    holder = Holder(run_id=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), started=now,
                    expires=now + ttl)
    write_atomic(store, path, json.dumps(asdict(holder)).encode())
    time.sleep(settle)
    confirmed = read_lease(store, experiment)
    if confirmed is None or confirmed.run_id != holder.run_id:
        other = confirmed.describe() if confirmed is not None else "unknown"
        raise LeaseHeld(f"experiment {experiment!r} in {store.uri} was claimed at the same moment by another run "
                        f"({other}); this run stops before writing anything")
    return Lease(store, experiment, holder, ttl)
