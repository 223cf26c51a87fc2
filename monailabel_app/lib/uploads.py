"""Uploaded files: a private temporary folder per request, removed on every path; safe archives.

MONAI Label's endpoints save each upload under a `tempfile.NamedTemporaryFile().name` and remove
it in a background task that runs only after a successful response, so every refused or failed
upload left its file in /tmp. Here an upload is written into a `TemporaryDirectory` opened by the
request (`with upload_folder() as folder:`), which Python removes however the request ends. The
file keeps the name the client gave it (checked to be one plain file name), so a reader's error
names the user's file, never a server temp path.

Archives (a session upload with `uncompress=true`) are unpacked member by member after every
member is checked: a relative path inside the target, a regular file or folder (no links, devices
or FIFOs), and within the member and size bounds. One bad member refuses the whole archive, so
nothing is ever written outside the target folder (`shutil.unpack_archive` follows `../` and
absolute names). Written here because the stdlib offers the tar filter but not the zip checks
nor a bound on the unpacked size.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from lib.validation import bad_request, check_upload_name

MAX_ARCHIVE_MEMBERS = 10000
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@contextlib.contextmanager
def upload_folder() -> Iterator[Path]:
    """A private folder for one request's uploads; removed with everything in it on exit."""
    with tempfile.TemporaryDirectory(prefix="fasttextdiff-upload-") as folder:
        yield Path(folder)


def save_upload(upload: Any, folder: Path, field: str = "file") -> Path:
    """Write a FastAPI UploadFile into `folder` under its own (checked) file name."""
    name = check_upload_name(getattr(upload, "filename", None), field)
    dest = folder / name
    try:
        with open(dest, "xb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
    except FileExistsError:
        raise bad_request(400, f"two uploaded files are named {name!r}; give each file its own name") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise bad_request(507, f"cannot receive {name!r}: {os.strerror(exc.errno)} on the server") from exc
        raise
    return dest


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _member_path(name: str, archive: str) -> PurePosixPath:
    """The relative path an archive member may be written to; 400 for anything that leaves the target."""
    shown = repr(name[:120])
    if not name or "\0" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise bad_request(400, f"archive {archive!r} has a member named {shown} with control characters or "
                               "backslashes; nothing was unpacked")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise bad_request(400, f"archive {archive!r} has a member {shown} outside its own folder (an absolute "
                               "path or '..'); nothing was unpacked")
    return path


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> int:
    """Unpack `archive` (zip or tar, possibly compressed) into the existing folder `dest` after
    checking every member; returns the number of files. 400 for an unsafe or unreadable archive,
    413 when it unpacks to more than `max_bytes`."""
    name = archive.name
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, dest, max_bytes)
    try:
        is_tar = tarfile.is_tarfile(archive)
    except OSError:
        is_tar = False
    if is_tar:
        return _extract_tar(archive, dest, max_bytes)
    raise bad_request(400, f"{name!r} is not a .zip or .tar archive; send it without uncompress=true")


def _check_count(count: int, archive: str) -> None:
    if count > MAX_ARCHIVE_MEMBERS:
        raise bad_request(413, f"archive {archive!r} has more than {MAX_ARCHIVE_MEMBERS} members")


def _too_big(archive: str, max_bytes: int):
    return bad_request(413, f"archive {archive!r} unpacks to more than {max_bytes // 2**20} MiB")


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> int:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            _check_count(len(members), archive.name)
            checked = []
            for info in members:
                relative = _member_path(info.filename, archive.name)
                kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type, when the zip records one
                if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise bad_request(400, f"archive {archive.name!r} has a member {info.filename[:120]!r} that is "
                                           "a link or special file; nothing was unpacked")
                checked.append((info, relative))
            if sum(info.file_size for info in members) > max_bytes:
                raise _too_big(archive.name, max_bytes)
            written = files = 0
            for info, relative in checked:
                target = dest.joinpath(*relative.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as out:
                    while block := src.read(1 << 20):
                        written += len(block)  # counted as unpacked: a lying header cannot pass the bound
                        if written > max_bytes:
                            raise _too_big(archive.name, max_bytes)
                        out.write(block)
                files += 1
            return files
    except (zipfile.BadZipFile, NotImplementedError, EOFError, FileExistsError, RuntimeError) as exc:
        raise bad_request(400, f"cannot unpack {archive.name!r}: {exc}") from None


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> int:
    try:
        with tarfile.open(archive) as tar:
            members = []
            total = 0
            for member in tar:
                _check_count(len(members) + 1, archive.name)
                _member_path(member.name, archive.name)
                if not (member.isfile() or member.isdir()):
                    raise bad_request(400, f"archive {archive.name!r} has a member {member.name[:120]!r} that is a "
                                           "link or special file; nothing was unpacked")
                total += member.size
                if total > max_bytes:
                    raise _too_big(archive.name, max_bytes)
                members.append(member)
            # the "data" filter refuses the same things again (Python's own guard, PEP 706)
            tar.extractall(dest, members=members, filter="data")
            return sum(1 for m in members if m.isfile())
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise bad_request(507, f"cannot unpack {archive.name!r}: {os.strerror(exc.errno)} on the server") from exc
        raise bad_request(400, f"cannot unpack {archive.name!r}: {exc}") from None
