"""Adapter archives (.tar.gz and .zip) of a folder, and unpacking them safely."""

import hashlib
import tarfile
import zipfile
from pathlib import Path

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


def unpack_archive(archive: Path, dest: Path) -> Path:
    """Unpack a .tar.gz or .zip into `dest`, refusing members that would land outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            for name in zipped.namelist():
                if not (dest / name).resolve().is_relative_to(dest.resolve()):
                    raise ValueError(f"unsafe path in archive: {name}")
            zipped.extractall(dest)
    else:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(dest, filter="data")
    return dest
