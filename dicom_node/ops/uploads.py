"""Uploads to the HTTP API, bounded and checked before anything reads them.

Both the inference API and the model admin API take files from a client: a
body is streamed to disk and refused with 413 as soon as it passes its limit
(the Content-Length is checked first), and a zip is opened only after every
member passed the checks a hostile archive fails: no absolute name, no `..`
component, no symbolic link, nothing encrypted, and an unpacked size under its
limit (the sizes the central directory declares; Python's reader never returns
more than a member declares, so a lying member cannot grow past it).
"""

from __future__ import annotations

import stat
import zipfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

MB = 1024 * 1024


class UploadRefused(Exception):
    """An upload the node does not take: `status` is the HTTP status (413, 415, 422...), the message says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def spool_stream(chunks: AsyncIterator[bytes], target: Path, max_bytes: int, declared: str | None,
                       limit_name: str) -> int:
    """Write the body to `target`; 413 (naming the config key `limit_name`) once it passes `max_bytes`."""
    limit = f"{limit_name} ({max_bytes / MB:g} MB)"
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise UploadRefused(413, f"the upload has {int(declared)} bytes, over {limit}")
    size = 0
    with target.open("wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise UploadRefused(413, f"the upload passed {limit}")
            out.write(chunk)
    if size == 0:
        raise UploadRefused(422, "the upload is empty")
    return size


def sniff(path: Path) -> str | None:
    """"zip", "nii.gz" or "nii" from the file's first bytes (its Content-Type is the client's guess),
    None for anything else. NIfTI-1 and -2 headers start with their size, 348 or 540 (either byte order)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == b"PK\x03\x04":
        return "zip"
    if head[:2] == b"\x1f\x8b":
        import gzip
        try:
            with gzip.open(path, "rb") as inner:
                head = inner.read(4)
        except (OSError, EOFError):
            return None
        return "nii.gz" if _nifti_header(head) else None
    return "nii" if _nifti_header(head) else None


def _nifti_header(head: bytes) -> bool:
    return len(head) == 4 and (int.from_bytes(head, "little") in (348, 540) or int.from_bytes(head, "big") in (348, 540))


def open_zip(path: Path, max_unpacked: int, limit_name: str) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """The archive and its file members (folders left out), once every member passed the module's checks."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise UploadRefused(422, f"not a readable zip archive (truncated?): {error}") from None
    try:
        members = [info for info in archive.infolist() if not info.is_dir()]
        for info in archive.infolist():
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                raise UploadRefused(422, f"zip member {info.filename!r} points outside the archive's folder")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UploadRefused(422, f"zip member {info.filename!r} is a symbolic link; links are refused")
            if info.flag_bits & 0x1:
                raise UploadRefused(422, f"zip member {info.filename!r} is encrypted")
        unpacked = sum(info.file_size for info in members)
        if unpacked > max_unpacked:
            raise UploadRefused(413, f"the zip unpacks to {unpacked} bytes, over {limit_name} "
                                     f"({max_unpacked / MB:g} MB)")
    except BaseException:
        archive.close()
        raise
    return archive, members


def extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path) -> None:
    """Copy one member to `target` (a name the caller chose, never the member's own); 422 when its data
    is damaged (CRC mismatch, truncated)."""
    try:
        with archive.open(member) as source, target.open("wb") as out:
            while chunk := source.read(MB):
                out.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as error:
        raise UploadRefused(422, f"zip member {member.filename!r} cannot be read: {error}") from None
