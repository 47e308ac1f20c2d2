"""The object storage interface every backend implements, and the streaming helpers they share."""

import hashlib
import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from core.errors import InvalidRequest, ObjectNotFound, PayloadTooLarge

CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    """A key is a relative path of non-empty segments; none may start with `.` (no `..`, no hidden temp files)."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidRequest(f"Invalid storage key {key!r}: it must be a non-empty relative path.", param="key")
    if any(not part or part.startswith(".") for part in key.split("/")):
        raise InvalidRequest(f"Invalid storage key {key!r}: empty segments and segments starting with '.' "
                             "are not allowed.", param="key")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is empty, or a key, or a key followed by `/`."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def check_range(start: int, end: int | None) -> None:
    if start < 0 or (end is not None and end < start):
        raise InvalidRequest(f"Invalid byte range [{start}, {end}).", param="range")


def not_found(key: str) -> ObjectNotFound:
    return ObjectNotFound(f"No object is stored under the key '{key}'.", param="key")


def stream_chunks(stream: BinaryIO, chunk_size: int, limit: int | None = None) -> Iterator[bytes]:
    """Chunks of `stream` (at most `limit` bytes in all), closing it when done or abandoned."""
    with stream:
        while limit is None or limit > 0:
            chunk = stream.read(chunk_size if limit is None else min(chunk_size, limit))
            if not chunk:
                return
            if limit is not None:
                limit -= len(chunk)
            yield chunk


class HashingReader(io.RawIOBase):
    """Reads a stream through, counting bytes and hashing them; refuses to go past `max_bytes`.

    Every `read(n)` returns exactly `n` bytes unless the stream ends, so multipart parts have their full size
    even when the source returns short reads. It is deliberately not seekable: bytes must pass in order.
    """

    def __init__(self, stream: BinaryIO, max_bytes: int | None):
        self._stream = stream
        self._max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_SIZE), b""))
        pieces, wanted = [], size
        while wanted > 0:
            piece = self._stream.read(wanted)
            if not piece:
                break
            pieces.append(piece)
            wanted -= len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._count(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _count(self, data: bytes) -> None:
        self.size += len(data)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise PayloadTooLarge(f"The upload is larger than the {self._max_bytes:,}-byte limit.", param="file")
        self._hash.update(data)


def write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Write to a hidden temporary file beside `path`, fsync, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage(ABC):
    """Objects under relative keys such as `projects/<id>/files/<file-id>`, streamed in and out."""

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None,
                   content_type: str | None = None) -> StoredObject:
        """Store a readable binary stream, read in chunks; over `max_bytes` raises PayloadTooLarge, storing nothing."""

    def put_file(self, key: str, path: Path) -> StoredObject:
        with open(path, "rb") as stream:
            return self.put_stream(key, stream)

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self.put_stream(key, io.BytesIO(data))

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE, *, start: int = 0,
                    end: int | None = None) -> Iterator[bytes]:
        """The bytes [start, end) of an object in chunks; a missing key raises ObjectNotFound before iteration."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable, buffered, streaming file-like object; close it (or use `with`)."""

    def download_to(self, key: str, path: Path) -> None:
        """Stream an object into a local file, replaced atomically."""
        write_atomically(Path(path), self.iter_chunks(key))

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def sha256(self, key: str) -> str:
        """Computed from the stored bytes, streaming."""
        digest = hashlib.sha256()
        for chunk in self.iter_chunks(key):
            digest.update(chunk)
        return digest.hexdigest()

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; a missing key is fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix`; returns how many."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Keys starting with `prefix`, sorted."""

    @abstractmethod
    def list_objects(self, prefix: str) -> list[tuple[str, float]]:
        """(key, last modified in seconds since the epoch) of every key starting with `prefix`, sorted by key."""

    @abstractmethod
    def abort_incomplete_uploads(self, started_before: float) -> int:
        """Discard writes begun before `started_before` that never completed (S3 multipart uploads, a local
        folder's temporary files) and return how many; later ones may still be in progress."""

    @abstractmethod
    def presigned_get_url(self, key: str, *, expires: int | None = None, filename: str | None = None) -> str | None:
        """A URL anyone can GET for `expires` seconds (default: the storage's `LORAJOBS_PRESIGN_EXPIRY_SECONDS`),
        downloaded as `filename`, or None where unsupported."""

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: raises ServiceUnavailable naming what failed."""


def attachment(filename: str) -> str:
    """A Content-Disposition for any file name: an ASCII fallback, and the exact name per RFC 6266/5987."""
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"
