"""Objects as files under a local folder: the embedded default."""

import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core.errors import ServiceUnavailable
from core.storage.base import (CHUNK_SIZE, HashingReader, Storage, StoredObject, check_key, check_prefix,
                               check_range, not_found, stream_chunks, write_atomically)


class LocalStorage(Storage):
    """Each key is a file under `root`; writes go to a hidden temporary file that is renamed into place."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _open_existing(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise not_found(key) from None

    def put_stream(self, key: str, stream: BinaryIO, *, max_bytes: int | None = None,
                   content_type: str | None = None) -> StoredObject:
        path = self._path(key)
        reader = HashingReader(stream, max_bytes)
        write_atomically(path, iter(lambda: reader.read(CHUNK_SIZE), b""))
        return StoredObject(key, reader.size, reader.sha256)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE, *, start: int = 0,
                    end: int | None = None) -> Iterator[bytes]:
        check_range(start, end)
        stream = self._open_existing(key)
        stream.seek(start)
        return stream_chunks(stream, chunk_size, None if end is None else end - start)

    def open(self, key: str) -> BinaryIO:
        return self._open_existing(key)

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise not_found(key)
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def list_keys(self, prefix: str) -> list[str]:
        return [key for key, _ in self.list_objects(prefix)]

    def list_objects(self, prefix: str) -> list[tuple[str, float]]:
        check_prefix(prefix)
        # Walk only the deepest folder the prefix names; hidden files are writes still in progress.
        top = self.root / prefix.rpartition("/")[0]
        found = []
        for folder, _, names in os.walk(top):
            relative = Path(folder).relative_to(self.root).as_posix()
            for name in names:
                key = name if relative == "." else f"{relative}/{name}"
                if not name.startswith(".") and key.startswith(prefix):
                    found.append((key, (Path(folder) / name).stat().st_mtime))
        return sorted(found)

    def abort_incomplete_uploads(self, started_before: float) -> int:
        """The hidden `.NAME.*.partial` files `write_atomically` leaves behind when its process dies mid-write."""
        removed = 0
        for partial in self.root.rglob(".*.partial"):
            try:
                if partial.stat().st_mtime < started_before:
                    partial.unlink()
                    removed += 1
            except FileNotFoundError:  # completed or removed meanwhile
                continue
        return removed

    def presigned_get_url(self, key: str, *, expires: int | None = None, filename: str | None = None) -> str | None:
        return None

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceUnavailable(f"Object folder {self.root} cannot be created: {exc.strerror}.") from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ServiceUnavailable(f"Object folder {self.root} is not writable.")
