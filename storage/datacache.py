"""Data sets on S3 made local: one copy per node, shared by every task that runs there.

torchvision's readers (and ``influence.data``) read local files only, and ``influence`` never imports
``storage``. So a data root given as ``s3://bucket/prefix`` is copied once to a local cache folder and the
tasks read that; ``jobs`` and ``cluster`` call :func:`local_data_root` and pass the result on as ``root``.

Several Ray tasks on one node start together and ask for the same data at once. The copy is therefore made
under an exclusive ``flock`` on a lock file beside the cache folder (the first caller copies, the others wait
for it, then find the copy made), into a hidden temporary folder that is renamed into place when whole, with a
marker file written last inside it. A reader thus sees no folder or a complete one; a copy killed half-way
leaves only a temporary folder, removed by the next copier. A completed copy is used as it is from then on,
without asking S3 (tasks on a node with the data need no S3 access): the cache is never refreshed, so delete
the folder to fetch new data under the same prefix.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid

import pyarrow.fs as pafs

from .retry import with_retries
from .s3 import parse_s3_uri
from .uri import _SCHEME, StoreError, open_store

__all__ = ["local_data_root", "cache_folder", "MARKER", "CACHE_ENV"]

CACHE_ENV = "FRAGILE_DATA_CACHE"
_DEFAULT_CACHE = os.path.join("~", ".cache", "fragile", "data")
MARKER = ".fragile-complete"  # written last into a finished copy: JSON naming the URI, file count and bytes


def local_data_root(root: str | None, *, cache_dir: str | None = None) -> str | None:
    """A local folder holding the data at ``root``: None stays None, a local path is returned expanded
    (``~``), a ``file://`` URI as its path, and ``s3://bucket/prefix`` is copied once into
    ``cache_folder(root, cache_dir)`` whose path is returned.

    Raises ``StoreError`` with one line for anything the user must fix: an unsupported scheme, no credentials,
    no such bucket, nothing under the prefix, or a copy that failed.
    """
    if root is None:
        return None
    if not isinstance(root, str) or not root.strip():
        raise StoreError(f"data root must be a non-empty string (a local folder or s3://bucket/prefix), got {root!r}")
    root = root.strip()
    match = _SCHEME.match(root)
    if match is None:
        return os.path.expanduser(root)
    if match.group(1).lower() != "s3":
        # file:// gives its path; any other scheme gets open_store's message naming the supported ones.
        return open_store(root, create=False).root
    return _cached_copy(root, cache_folder(root, cache_dir))


def cache_folder(uri: str, cache_dir: str | None = None) -> str:
    """Where ``s3://bucket/prefix`` is cached: ``<cache>/<bucket>/<prefix>``, with ``<cache>`` from ``cache_dir``,
    else ``$FRAGILE_DATA_CACHE``, else ``~/.cache/fragile/data``."""
    bucket, prefix = parse_s3_uri(uri)
    base = cache_dir or os.environ.get(CACHE_ENV) or _DEFAULT_CACHE
    return os.path.join(os.path.abspath(os.path.expanduser(base)), bucket, *prefix.split("/") if prefix else [])


def _cached_copy(uri: str, target: str) -> str:
    if _complete(target):  # the common case once a node has the data: no lock, no S3
        return target
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    with open(os.path.join(parent, f".{name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process (or thread) of this node copies
        try:
            if _complete(target):  # it copied while we waited
                return target
            if os.path.exists(target):
                raise StoreError(f"the cache folder {target} exists but holds no completed copy of {uri} (no "
                                 f"{MARKER} in it): remove it, and the next run copies {uri} again")
            _remove_stale_copies(parent, name)
            _copy(uri, parent, name, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _complete(target: str) -> bool:
    """Whether ``target`` is a finished copy, or a folder inside one (``s3://b/data/mnist`` once ``s3://b/data``
    is cached: its files are already there, and copying them again into the same place would clash)."""
    if not os.path.isdir(target):
        return False
    folder = target
    while True:
        if os.path.isfile(os.path.join(folder, MARKER)):
            return True
        up = os.path.dirname(folder)
        if up == folder:
            return False
        folder = up


def _remove_stale_copies(parent: str, name: str) -> None:
    # Temporary folders left by a copier that died; only the lock holder creates them, and we hold the lock.
    for entry in os.scandir(parent):
        if entry.name.startswith(f".{name}.tmp-") and entry.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)


def _copy(uri: str, parent: str, name: str, target: str) -> None:
    store = open_store(uri, create=False)  # StoreError for credentials, bucket, reachability
    try:
        listing = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StoreError(f"cannot list {uri}: {exc}") from None
    files = [info for info in listing if info.type == pafs.FileType.File]
    if not files:
        raise StoreError(f"no files under {uri}: upload the data set there first (e.g. `aws s3 sync ./data {uri}`), "
                         f"or fix the prefix")
    temp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        # copy_files fetches many objects in parallel (pyarrow's I/O threads); a retry starts over into the
        # same folder, replacing what the failed attempt wrote.
        with_retries(lambda: pafs.copy_files(store.root, temp, source_filesystem=store.fs,
                                             destination_filesystem=pafs.LocalFileSystem(), use_threads=True))
        record = {"uri": store.uri, "files": len(files), "bytes": sum(info.size for info in files),
                  "copied_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(os.path.join(temp, MARKER), "w") as out:
            json.dump(record, out)
        os.rename(temp, target)  # atomic: readers see no folder or the whole copy
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise StoreError(f"cannot copy {uri} to {target}: {exc}") from None
        raise
