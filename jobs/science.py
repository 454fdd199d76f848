"""Which version of the science code wrote a stored result.

The package version says little about the numbers: a fix in a solver or in the retraining changes them without
a release. So every part and checkpoint carries `SCIENCE`, a hash of the source of the code that decides what
is computed: the `influence/` package (models, training, solvers, retraining, metrics) and the protocol code
(`jobs/protocol.py`: damping, seeds, controls, the ranking of removals, part names; `jobs/tasks.py`, `jobs/data_source.py` (the data a task gets) and
`jobs/shards.py`: the task bodies; `jobs/plan.py`: the tasks; `jobs/stats.py`: the statistics). Orchestration (the pipeline, the runners,
the coordinator, the Tune driver), storage, the CLI and the report are left out: they change how results are
made or shown, not what they are.

A run that finds parts with another stamp says so (see `Coordinator.stale_report`), and `fragile run
--recompute-stale` sets those configurations aside and computes them again. Parts written before stamps
existed read with a null stamp, shown as `UNSTAMPED`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCIENCE_SOURCES = ("influence", "jobs/protocol.py", "jobs/tasks.py", "jobs/data_source.py", "jobs/shards.py", "jobs/plan.py",
                   "jobs/stats.py")
UNSTAMPED = "unstamped"


def _files() -> list[Path]:
    out = []
    for name in SCIENCE_SOURCES:
        path = ROOT / name
        out.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return out


def science_version() -> str:
    """12 hex digits of the SHA-256 of the science sources (their paths and bytes, in a fixed order)."""
    digest = hashlib.sha256()
    for path in _files():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


SCIENCE = science_version()


def stamp_of(value: str | None) -> str:
    """A stored stamp as shown to a user (null: written before parts carried one)."""
    return value if value else UNSTAMPED
