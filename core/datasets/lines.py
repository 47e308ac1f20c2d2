"""Physical lines of a binary stream in bounded memory: a line over the limit is skipped, never held."""

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

READ_SIZE = 1 << 16
HEAD_SIZE = 16  # enough for every file signature and for telling a JSON array from an object


@dataclass(frozen=True)
class RawLine:
    number: int  # 1-based, counting blank lines, as an editor does
    data: bytes | None  # the line without its LF or CRLF; None when it was longer than the limit
    head: bytes  # the line's first bytes, kept even when `data` is None
    size: int  # bytes in the line, line ending excluded
    has_nul: bool


class _ReadAdapter(io.RawIOBase):
    """Anything with `read(n)` (a file, an S3 body, a generator-backed stream) as a raw stream."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer)) or b""
        buffer[: len(data)] = data
        return len(data)


def read_lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[RawLine]:
    """Every line of `stream`; a line longer than `max_line_bytes` comes back with `data=None`."""
    reader = io.BufferedReader(_ReadAdapter(stream), READ_SIZE)
    limit = max_line_bytes + 1  # room for the LF of a line exactly at the limit
    number = 0
    while data := reader.readline(limit):
        number += 1
        if data.endswith(b"\n") or len(data) < limit:
            yield _complete_line(number, data)
        else:
            yield _skip_rest_of_line(number, data, reader)


def _complete_line(number: int, data: bytes) -> RawLine:
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    return RawLine(number, data, data[:HEAD_SIZE], len(data), b"\0" in data)


def _skip_rest_of_line(number: int, start: bytes, reader: io.BufferedReader) -> RawLine:
    """Read to the end of an over-long line a chunk at a time, keeping only its size and head."""
    size, has_nul, head = len(start), b"\0" in start, start[:HEAD_SIZE]
    while part := reader.readline(READ_SIZE):
        has_nul = has_nul or b"\0" in part
        if part.endswith(b"\n"):
            size += len(part.removesuffix(b"\n").removesuffix(b"\r"))
            break
        size += len(part)
    return RawLine(number, None, head, size, has_nul)
