"""Where a store lives: a URI turned into a ``pyarrow.fs`` filesystem and a root path inside it.

Every other module of ``storage`` reaches the data only through ``Store.fs`` and paths built by
``Store.path``, so that an S3 filesystem can replace the local one without touching them. This version
opens local stores only (a plain path or a ``file://`` URI); other schemes are refused with a message.

The one write primitive, ``write_atomic``, lives here as well: parts and checkpoints both need "the reader
never sees half a file", and the way to get it depends on the filesystem, not on what is written.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

__all__ = ["StoreError", "Store", "open_store", "write_atomic", "read_bytes", "check_name"]

# "s3://...", "gs://...", "file://..."; a Windows drive ("C:\\") has no "//" and is not a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Names that become one path segment (experiments, configuration ids, parts, model keys). Kept to characters
# that are safe in every filesystem and in S3 keys; a leading "." or "_" is refused because pyarrow's
# dataset discovery (and our own listings) treat such files as hidden.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_NAME_MAX = 200


class StoreError(Exception):
    """A problem with a store that the user can fix (bad URI, unsupported scheme, bad name)."""


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
    in its own process. That keeps pickles small and lets a worker pick up its own credentials later (S3).
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

    def __reduce__(self) -> tuple:
        return (_reopen, (self.uri,))


def open_store(uri: str, *, create: bool = True) -> Store:
    """Open the store at ``uri``: a local path or a ``file://`` URI.

    With ``create`` the folder is created if absent; without it an absent folder is fine too (reads see an
    empty store). A path that exists but is a file, or a scheme other than ``file``, raises ``StoreError``.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError(f"store URI must be a non-empty string, got {uri!r}")
    uri = uri.strip()
    match = _SCHEME.match(uri)
    if match and match.group(1).lower() != "file":
        scheme = match.group(1).lower()
        raise StoreError(
            f"store {uri!r} uses the {scheme}:// scheme, but this version of fragile supports local stores "
            f"only: give a local path (e.g. ./results) or a file:// URI"
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
    """Unpickle a ``Store``: open it again from its URI, without creating folders as a side effect."""
    return open_store(uri, create=False)


def write_atomic(store: Store, path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` so that a reader sees either nothing, the old file, or the whole new file.

    The bytes go to a hidden temporary sibling (".<stem>.tmp-<uuid><ext>", ignored by every listing) which
    is then moved onto ``path``; moving onto an existing file replaces it, so writing twice is idempotent.
    On any failure the temporary file is removed. Returns ``path``.
    """
    folder, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    temp = f"{folder}/.{stem}.tmp-{uuid.uuid4().hex}{dot}{ext}"
    store.fs.create_dir(folder, recursive=True)
    try:
        with store.fs.open_output_stream(temp) as out:
            out.write(data)
        # LocalFileSystem.move is rename(2): atomic and replacing. (S3 will want a single whole PUT instead.)
        store.fs.move(temp, path)
    except BaseException as exc:
        _remove_quietly(store, temp)
        # Keep the exception's type (callers retry transient OSErrors by type) but say which file it was.
        if isinstance(exc, Exception):
            exc.add_note(f"while writing {path} (through the temporary file {temp})")
        raise
    return path


def read_bytes(store: Store, path: str) -> bytes | None:
    """The whole content of the file at ``path``, or None when there is no such file."""
    try:
        with store.fs.open_input_stream(path) as src:
            return src.read()
    except FileNotFoundError:
        return None


def _remove_quietly(store: Store, path: str) -> None:
    # Used while another error propagates: that error is the one worth reporting.
    try:
        store.fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
