"""Ray Jobs: submit `fragile run` to a cluster, and follow, inspect or stop what was submitted.

The job ships the project's packages and the spec as its working directory, so the cluster runs exactly the
code that was submitted (a later edit on the submitting machine cannot mix versions into a running job).
Secrets never travel: the runtime environment is visible on the dashboard, so workers take S3 credentials
from their own environment.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("influence", "storage", "jobs", "cluster")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Only settings that are safe to show on the dashboard.
_JOB_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


class SubmitError(Exception):
    """A user-facing problem with the cluster address or a job id."""


def auth_token() -> str | None:
    """The Ray token this shell holds: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names (what
    `fragile cluster env` exports), else None. Read here, not by Ray, so that it works whatever authentication
    mode Ray fixed for this process when it was first imported."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            return Path(path).expanduser().read_text().strip() or None
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({exc}); is the cluster still up? "
                              "`fragile cluster env` prints the current settings") from None
    return None


_AUTH_HINT = ("the cluster requires a Ray token: for a cluster from `fragile cluster up`, run "
              "`eval \"$(fragile cluster env)\"` first; otherwise set RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN)")


def _refused(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    return any(mark in text for mark in ("Authentication required", "Authentication failed", "Unauthorized",
                                         "Forbidden", "InvalidAuthToken", "AuthenticationError"))


def _explain(exc: BaseException, what: str) -> SubmitError:
    if _refused(exc):
        return SubmitError(f"{what}: {_AUTH_HINT}")
    return SubmitError(f"{what}: {exc}")


def client(address: str, *, token: str | None = None):
    """A JobSubmissionClient for the dashboard at `address` (with the Ray token when there is one: `token`,
    else `auth_token()`), or a SubmitError saying how to get one."""
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's job SDK loggers set themselves to INFO ("Uploading package ...", "WebSocket closed ...").
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)

    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address given here (and ray.init sets
    # RAY_ADDRESS in its own process); the address the user named must win.
    token = token or auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, ValueError or RuntimeError here
        if _refused(exc):
            raise SubmitError(f"the Ray dashboard at {address} refused this client: {_AUTH_HINT}") from None
        raise SubmitError(f"cannot reach a Ray dashboard at {address} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); start a local cluster with "
                          "`fragile cluster up` or pass --address http://HEAD:8265") from None
    finally:
        os.environ.update(saved)


def _stage(spec: Path) -> Path:
    """A temporary working directory with the project's packages and the spec (as spec.yaml)."""
    stage = Path(tempfile.mkdtemp(prefix="fragile-job-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in PACKAGES:
        shutil.copytree(PROJECT_ROOT / pkg, stage / pkg, ignore=ignore)
    shutil.copyfile(spec, stage / "spec.yaml")
    return stage


@dataclass(frozen=True)
class Submitted:
    job_id: str
    dashboard: str
    entrypoint: str


def submit(spec: str | Path, address: str, store: str, *, extra_args: tuple[str, ...] = ()) -> Submitted:
    """Submit `fragile run SPEC --store STORE` as a Ray job running on the cluster itself."""
    spec = Path(spec)
    if not spec.is_file():
        raise SubmitError(f"spec {spec} not found")
    c = client(address)
    stage = _stage(spec)
    try:
        # `python -m` puts the working directory first on sys.path: the shipped code, not an installed copy.
        entrypoint = " ".join(["python -m fragile run spec.yaml --address auto --store", shlex.quote(store),
                               *map(shlex.quote, extra_args)])
        job_id = _submit_when_ready(c, entrypoint=entrypoint, metadata={"spec": spec.name, "store": store},
                                    runtime_env={"working_dir": str(stage), "env_vars": _JOB_ENV})
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Submitted(job_id=job_id, dashboard=f"{address.rstrip('/')}/#/jobs/{job_id}", entrypoint=entrypoint)


def _submit_when_ready(c, *, wait: float = 60.0, **job) -> str:
    """submit_job, waiting while a freshly started head has no job agent yet (Ray answers HTTP 500 then)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return c.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise _explain(exc, "the cluster refused the job") from None
            time.sleep(1)


def status(address: str, job_id: str | None = None) -> list[dict]:
    """One job's status, or every job's, newest first."""
    c = client(address)
    if job_id:
        try:
            info = c.get_job_info(job_id)
        except RuntimeError as exc:
            raise _explain(exc, f"no job {job_id} at {address}") from None
        infos = [info]
    else:
        try:
            infos = sorted(c.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
        except RuntimeError as exc:
            raise _explain(exc, f"cannot list the jobs at {address}") from None
    return [{"job": i.submission_id or i.job_id, "status": str(getattr(i.status, "value", i.status)),
             "started": _utc(i.start_time), "entrypoint": i.entrypoint, "message": _last_line(i.message)}
            for i in infos]


def _utc(ms: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ms else ""


def _last_line(message: str | None) -> str:
    """A failed job's message ends with its traceback; its last line (whole) says what went wrong."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def logs(address: str, job_id: str, *, follow: bool = False, out=print) -> None:
    c = client(address)
    try:
        if not follow:
            out(c.get_job_logs(job_id), end="")
            return

        async def tail():
            async for chunk in c.tail_job_logs(job_id):
                out(chunk, end="")

        asyncio.run(tail())
    except RuntimeError as exc:
        raise _explain(exc, f"no job {job_id} at {address}") from None


def stop(address: str, job_id: str) -> bool:
    try:
        return client(address).stop_job(job_id)
    except RuntimeError as exc:
        raise _explain(exc, f"no job {job_id} at {address}") from None
