"""Where a store lives: a URI turned into a ``pyarrow.fs`` filesystem and a root path inside it.

Every other module of ``storage`` reaches the data only through ``Store.fs`` and paths built by
``Store.path``, so the same code serves a local folder (a plain path or a ``file://`` URI) and S3
(``s3://bucket/prefix``, opened by ``storage.s3`` from the standard AWS_* environment). Other schemes are
refused with a message.

The two I/O primitives live here as well. ``write_atomic``: parts and checkpoints both need "the reader
never sees half a file", and the way to get it depends on the filesystem, not on what is written (a
temporary file and a rename locally; one whole PUT on S3, where a move is a copy plus a delete).
``read_bytes``: one whole read. Both retry transient errors (``storage.retry``).
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from .retry import with_retries

__all__ = ["StoreError", "Store", "open_store", "write_atomic", "read_bytes", "check_name", "list_files",
           "is_file", "delete_file", "move_file"]

# "s3://...", "gs://...", "file://..."; a Windows drive ("C:\\") has no "//" and is not a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Names that become one path segment (experiments, configuration ids, parts, model keys). Kept to characters
# that are safe in every filesystem and in S3 keys; a leading "." or "_" is refused because pyarrow's
# dataset discovery (and our own listings) treat such files as hidden.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_NAME_MAX = 200


class StoreError(Exception):
    """A problem with a store that the user can fix (bad URI, unsupported scheme, bad name, S3 access)."""


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is usable as one path segment of the store, else raise ``StoreError``.

    ``kind`` says what the name is ("part", "config_id", ...) so the message can point at the culprit.
    """
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > _NAME_MAX:
        raise StoreError(
            f"invalid {kind} {name!r}: use letters, digits and '._+-' only, start with a letter or a digit "
            f"(a leading '.' or '_' marks hidden files), at most {_NAME_MAX} characters, no '/'"
        )
    return name


@dataclass(frozen=True)
class Store:
    """An opened store: ``fs`` holds the data, ``root`` is the store's folder inside ``fs``.

    ``uri`` is what the user gave, normalised (a local path is made absolute), and is enough to open the
    same store again: pickling sends only the URI, and the receiver (a Ray worker) rebuilds the filesystem
    in its own process from its own environment. That keeps pickles small and S3 secrets out of them.
    """

    uri: str
    # Left out of == and hash(): pyarrow filesystems are not hashable, and uri + root identify the store.
    fs: pafs.FileSystem = field(compare=False)
    root: str

    def path(self, *parts: str) -> str:
        """Join ``parts`` under the root with "/" (the separator of every ``pyarrow.fs`` filesystem)."""
        segments = [self.root.rstrip("/")]
        segments += [p.strip("/") for p in parts if p and p.strip("/")]
        return "/".join(segments)

    def uri_of(self, path: str) -> str:
        """A path inside ``fs`` as a user would write it: ``s3://bucket/key`` on S3, the path itself locally."""
        return f"s3://{path}" if self.uri.startswith("s3://") else path

    def __reduce__(self) -> tuple:
        return (_reopen, (self.uri,))


def open_store(uri: str, *, create: bool = True, check: bool = True) -> Store:
    """Open the store at ``uri``: a local path, a ``file://`` URI or ``s3://bucket/prefix``.

    Local: with ``create`` the folder is created if absent; without it an absent folder is fine too (reads
    see an empty store). A path that exists but is a file raises ``StoreError``.
    S3: the bucket is checked first (credentials, existence, reachability; see ``storage.s3``), and any
    failure is a ``StoreError`` saying what to fix; ``check=False`` skips that request (a worker reopening a
    store the driver checked). ``create`` has no effect: prefixes need no creating, and buckets are never
    created. Any other scheme raises ``StoreError``.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError(f"store URI must be a non-empty string, got {uri!r}")
    uri = uri.strip()
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else "file"
    if scheme == "s3":
        from .s3 import open_s3  # boto3 is imported by the processes that use S3 only

        normalised, fs, root = open_s3(uri, check=check)
        return Store(uri=normalised, fs=fs, root=root)
    if scheme != "file":
        raise StoreError(
            f"store {uri!r} uses the {scheme}:// scheme, which fragile does not support: give a local path "
            f"(e.g. ./results), a file:// URI or s3://bucket/prefix"
        )
    if match:
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(
                f"store {uri!r} names the host {parsed.netloc!r}; a file:// URI must be file:///absolute/path"
            )
        # os.path is used for string normalisation only; all I/O below goes through pyarrow.fs.
        root = os.path.abspath(os.path.expanduser(unquote(parsed.path)))
        normalised = "file://" + root
    else:
        root = os.path.abspath(os.path.expanduser(uri))
        normalised = root
    fs = pafs.LocalFileSystem()
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise StoreError(f"store {uri!r} is a file ({root}); a store must be a folder (or not exist yet)")
    if info.type == pafs.FileType.NotFound and create:
        try:
            fs.create_dir(root, recursive=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {root}: {exc}") from exc
    return Store(uri=normalised, fs=fs, root=root)


def _reopen(uri: str) -> Store:
    """Unpickle a ``Store``: open it again from its URI, without creating folders as a side effect and without
    a request to the server (the driver checked the bucket before any work; a worker that starts while the
    store is briefly unreachable must not fail for good on a check its first real request would retry)."""
    return open_store(uri, create=False, check=False)


def write_atomic(store: Store, path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` so that a reader sees either nothing, the old file, or the whole new file.

    The one place that decides how, by filesystem:
    - S3: the bytes are PUT whole to ``path`` (one write of the complete buffer; ``storage.s3`` opens the
      filesystem with delayed open, so the object is sent on close, in one request). S3 shows a PUT to
      readers all at once, and there is no rename to use: a move would be a copy plus a delete.
    - Local: the bytes go to a hidden temporary sibling (".<stem>.tmp-<uuid><ext>", ignored by every
      listing) which is then renamed onto ``path``; on failure the temporary file is removed.
    Either way writing twice replaces the file (idempotent), transient errors are retried, and a failure
    keeps its exception type with a note naming ``path``. Returns ``path``.
    """
    put = _put_whole if store.fs.type_name == "s3" else _write_then_move
    try:
        with_retries(lambda: put(store.fs, path, data), op="write", uri=store.uri_of(path))
    except Exception as exc:
        # Keep the exception's type (callers retry transient OSErrors by type) but say which file it was.
        exc.add_note(f"while writing {path}")
        raise
    return path


def _put_whole(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    # No create_dir: S3 prefixes need none, and pyarrow would PUT an empty "folder/" marker object.
    with fs.open_output_stream(path) as out:
        out.write(data)


def _write_then_move(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    folder, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    temp = f"{folder}/.{stem}.tmp-{uuid.uuid4().hex}{dot}{ext}"
    fs.create_dir(folder, recursive=True)
    try:
        with fs.open_output_stream(temp) as out:
            out.write(data)
        fs.move(temp, path)  # LocalFileSystem.move is rename(2): atomic, and it replaces an existing file
    except BaseException as exc:
        _remove_quietly(fs, temp)
        if isinstance(exc, Exception):
            exc.add_note(f"the bytes went to the temporary file {temp}, removed again")
        raise


def read_bytes(store: Store, path: str) -> bytes | None:
    """The whole content of the file at ``path`` (one read, transient errors retried); None when absent."""
    def read() -> bytes | None:
        try:
            with store.fs.open_input_stream(path) as src:
                return src.read()
        except FileNotFoundError:
            return None

    return with_retries(read, op="read", uri=store.uri_of(path))


def list_files(store: Store, root: str, *, recursive: bool = True) -> list[pafs.FileInfo]:
    """Everything under ``root`` (files and folders; an absent root is empty), transient errors retried."""
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=recursive)
    return with_retries(lambda: store.fs.get_file_info(selector), op="list", uri=store.uri_of(root))


def is_file(store: Store, path: str) -> bool:
    """Whether a file is at ``path``, transient errors retried."""
    return with_retries(lambda: store.fs.get_file_info(path).type == pafs.FileType.File, op="stat",
                        uri=store.uri_of(path))


def delete_file(store: Store, path: str) -> bool:
    """Remove the file at ``path``; False if it was not there. Transient errors retried."""
    def delete() -> bool:
        try:
            store.fs.delete_file(path)
        except FileNotFoundError:
            return False
        return True

    return with_retries(delete, op="delete", uri=store.uri_of(path))


def move_file(store: Store, src: str, dst: str) -> None:
    """Move a file within the store (a rename locally; a copy and a delete on S3), transient errors retried.
    Used to set a bad file aside, so it is kept for inspection but no longer read."""
    def move() -> None:
        folder = dst.rpartition("/")[0]
        if store.fs.type_name != "s3" and folder:
            store.fs.create_dir(folder, recursive=True)
        store.fs.move(src, dst)

    with_retries(move, op="move", uri=f"{store.uri_of(src)} -> {store.uri_of(dst)}")


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    # Used while another error propagates: that error is the one worth reporting.
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
