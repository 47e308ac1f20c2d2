"""Adapter archives (.tar.gz and .zip) of a folder, and unpacking them safely."""

import hashlib
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

ARCHIVE_FORMATS = ("tar.gz", "zip")
MERGED_FORMAT = "tar"  # merged weights barely compress; an uncompressed tar is written and read at disk speed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_archive(folder: Path, dest: Path, fmt: str) -> Path:
    """Pack every file of `folder` (recursively, paths relative to it) into `dest`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if fmt in ("tar.gz", "tar"):
        with tarfile.open(dest, "w:gz" if fmt == "tar.gz" else "w") as tar:
            for path in files:
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    elif fmt == "zip":
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in files:
                archive.write(path, arcname=path.relative_to(folder).as_posix())
    else:
        raise ValueError(f"unknown archive format {fmt!r}")
    return dest


MAX_UNPACKED_BYTES = 64 << 30  # far above any adapter or checkpoint; bounds a decompression bomb
MAX_MEMBERS = 10_000  # an adapter is a dozen files; a checkpoint a few dozen
COPY_CHUNK = 1 << 20


def archive_format(path: Path) -> str:
    """`tar.gz`, `zip` or `tar`, from the file's first bytes (never from its name), or a ValueError."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    raise ValueError(f"{path.name} is not a .tar.gz, .zip or .tar archive")


def _members(archive: Path, fmt: str) -> Iterator[tuple[str, str, Callable[[], BinaryIO] | None]]:
    """(name, kind, opener) of each member in order: kind is `file`, `dir` or what else it is (refused)."""
    if fmt == "zip":
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    yield info.filename, "link", None
                elif info.is_dir():
                    yield info.filename, "dir", None
                else:
                    yield info.filename, "file", lambda info=info: zipped.open(info)
        return
    with tarfile.open(archive, "r:gz" if fmt == "tar.gz" else "r:") as tar:
        for member in tar:  # one pass over the stream: a .tar.gz is not decompressed twice
            if member.isfile():
                yield member.name, "file", lambda member=member: tar.extractfile(member)
            elif member.isdir():
                yield member.name, "dir", None
            else:
                yield member.name, "link" if member.issym() or member.islnk() else "special file", None


def _target(dest: Path, name: str) -> Path:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith("/") or ".." in parts or ":" in parts[0]:
        raise ValueError(f"unsafe path in archive: {name!r}")
    target = dest.joinpath(*parts).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise ValueError(f"unsafe path in archive: {name!r}")
    return target


def unpack_archive(archive: Path, dest: Path, *, fmt: str | None = None, max_bytes: int = MAX_UNPACKED_BYTES,
                   max_members: int = MAX_MEMBERS) -> Path:
    """Unpack a .tar.gz, .zip or .tar into `dest`, or refuse it with a ValueError and leave nothing behind.

    Refused: another format than `fmt` (when given) or than its first bytes say, more than `max_members`
    members, more than `max_bytes` unpacked (counted as written, not as the archive declares), a path out of
    `dest`, and links or special files.
    """
    found = archive_format(archive)
    if fmt is not None and found != fmt:
        raise ValueError(f"{archive.name} is a {found} archive, not the expected {fmt}")
    created: list[Path] = []
    try:
        if not dest.exists():
            dest.mkdir(parents=True)
            created.append(dest)
        written = 0
        for count, (name, kind, opener) in enumerate(_members(archive, found), start=1):
            if count > max_members:
                raise ValueError(f"the archive has more than {max_members:,} members")
            target = _target(dest, name)
            if kind == "dir":
                if not target.exists():
                    target.mkdir(parents=True)
                    created.append(target)
                continue
            if kind != "file":
                raise ValueError(f"the archive holds a {kind} ({name!r}); only files and folders are unpacked")
            if not target.parent.exists():
                target.parent.mkdir(parents=True)
                created.append(target.parent)
            with opener() as source, open(target, "wb") as out:
                created.append(target)
                while chunk := source.read(COPY_CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise ValueError(f"the archive unpacks to more than {max_bytes:,} bytes")
                    out.write(chunk)
    except (ValueError, OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as exc:
        for path in reversed(created):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if isinstance(exc, ValueError):
            raise
        raise ValueError(f"{archive.name} is damaged: {exc}") from exc
    return dest
