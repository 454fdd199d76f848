"""One run per experiment: the lease in the store refuses a second run, expires when its holder stops renewing,
is stale at once when its holder (on this host) is dead, and can be taken over with force (local and S3)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from storage.lease import LEASE, LeaseHeld, acquire, read_lease
from storage.uri import write_atomic

EXP = "iris"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_is_refused_naming_the_first(store):
    with acquire(store, EXP, settle=0.05) as first:
        with pytest.raises(LeaseHeld) as info:
            acquire(store, EXP, settle=0.05)
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and first.holder.host in message and "--force" in message
    assert read_lease(store, EXP) is None  # released: the next run takes it
    acquire(store, EXP, settle=0.05).release()


def test_a_dead_holder_on_this_host_is_stale_at_once(store):
    with acquire(store, EXP, settle=0.05) as lease:
        dead = dataclasses.replace(lease.holder, pid=_dead_pid(), run_id="crashed")
        lease._stop.set()  # the crashed run renews nothing
        write_atomic(store, store.path(EXP, LEASE), json.dumps(dataclasses.asdict(dead)).encode())
    notes = []
    taken = acquire(store, EXP, settle=0.05, notice=notes.append)
    assert taken.holder.run_id != "crashed" and "no longer running" in notes[0]
    taken.release()


def test_an_expired_lease_does_not_block_and_force_takes_a_live_one(store):
    first = acquire(store, EXP, ttl=0.6, settle=0.05)
    first._stop.set()  # stops renewing, as a run on another host that died would
    first._thread.join()
    other_host = dataclasses.replace(first.holder, host="elsewhere")
    write_atomic(store, store.path(EXP, LEASE), json.dumps(dataclasses.asdict(other_host)).encode())
    with pytest.raises(LeaseHeld, match="when its lease expires"):
        acquire(store, EXP, settle=0.05)
    time.sleep(0.8)
    notes = []
    second = acquire(store, EXP, ttl=30, settle=0.05, notice=notes.append)
    assert "has expired" in notes[0]
    third = acquire(store, EXP, force=True, settle=0.05, notice=notes.append)
    assert "--force" in notes[1] and read_lease(store, EXP).run_id == third.holder.run_id
    second.release()  # no longer its lease: it must not remove the new holder's
    assert read_lease(store, EXP).run_id == third.holder.run_id
    third.release()


def test_the_lease_is_renewed_while_the_run_lives(store):
    with acquire(store, EXP, ttl=0.6, settle=0.05) as lease:
        first_expiry = read_lease(store, EXP).expires
        time.sleep(0.5)
        assert read_lease(store, EXP).expires > first_expiry
        assert lease.lost is None
