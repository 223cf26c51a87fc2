"""Refuse image files that name other files inside themselves, before any reader opens them.

Several medical formats keep their voxels in a second file named in the header: NRRD/NHDR
(`data file:` / `datafile:`, also as a LIST or a printf-style pattern), MetaImage MHD/MHA
(`ElementDataFile` other than `LOCAL`), Analyze and two-file NIfTI (`.hdr` + `.img`), DICOMDIR
(a directory of other files), multi-file OME-TIFF (`<UUID FileName=...>`) and MicroManager
stacks. A reader given such an upload opens whatever path the sender wrote, anywhere on the
server (an arbitrary file read), and whether that path exists changes the answer (an existence
oracle). `check_self_contained` reads only the file's own first bytes, never the named path, so
the refusal is the same whatever the header names.

The library's `read_image` calls it for every file unless the caller passes
`allow_external_data=True` (the CLI's `segment` on a user's own files); the server never does.
Written here rather than taken from a reader because every reader's job is to follow the
reference, not to refuse it.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

from fasttextdiff.utils.errors import ImageReadError

HEADER_BYTES = 64 * 1024  # text headers (NRRD, MetaImage) are far smaller; only this much is read

# a NRRD field that makes the reader open another file ("data file", "datafile"; any case, as teem reads it)
_NRRD_DATA_FILE = re.compile(rb"^\s*data\s?file\s*:", re.IGNORECASE | re.MULTILINE)
_META_KEY = re.compile(rb"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
_META_FIRST_KEYS = {b"objecttype", b"ndims", b"comment", b"objectsubtype", b"transformtype", b"name", b"id",
                    b"parentid", b"binarydata", b"binarydatabyteordermsb", b"elementbyteordermsb",
                    b"compresseddata", b"dimsize", b"headersize", b"elementtype", b"elementdatafile"}
_NIFTI_EXTENSIONS = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")
_TWO_FILE_EXTENSIONS = (".hdr", ".img", ".hdr.gz", ".img.gz")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def _refuse(path: Path, what: str) -> None:
    raise ImageReadError(f"{path.name} {what}; only self-contained files are accepted (save it as a single "
                         "file, e.g. .nrrd, .mha or .nii.gz, and upload that).")


def check_self_contained(path: str | os.PathLike) -> None:
    """Raise ImageReadError when `path` (a file, or a folder of DICOM files) would make a reader
    open another file. A missing path is left to the reader to report."""
    path = Path(path)
    if path.is_symlink():
        _refuse(path, "is a symbolic link to another file")
    if path.is_dir():
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if entry.is_symlink():
                _refuse(Path(entry.path), "in the folder is a symbolic link to another file")
            if entry.is_file(follow_symlinks=False):
                check_self_contained(entry.path)
        return
    if not path.is_file():
        return
    name = path.name.lower()
    if name == "dicomdir":
        _refuse(path, "is a DICOMDIR (an index of other DICOM files)")
    if name.endswith(_TWO_FILE_EXTENSIONS):
        _refuse(path, "is an Analyze/NIfTI header or data file whose other half is a separate file")
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    if head.startswith(b"NRRD"):
        _check_nrrd(path, head)
    elif name.endswith((".mha", ".mhd")) or _looks_like_metaimage(head):
        _check_metaimage(path, head)
    elif name.endswith(_NIFTI_EXTENSIONS) or head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] in (b"n+2\0",
                                                                                                    b"ni2\0"):
        _check_nifti(path, head)
    elif head[128:132] == b"DICM" or name.endswith((".dcm", ".dicom", ".ima")):
        _check_dicom(path)
    elif head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        _check_tiff(path)


def _check_nrrd(path: Path, head: bytes) -> None:
    ends = [i for i in (head.find(b"\n\n"), head.find(b"\r\n\r\n")) if i >= 0]
    if not ends and len(head) >= HEADER_BYTES:
        _refuse(path, f"has a NRRD header longer than {HEADER_BYTES // 1024} KiB")
    header = head[:min(ends)] if ends else head  # the header ends at the first blank line
    if _NRRD_DATA_FILE.search(header) or path.name.lower().endswith(".nhdr"):
        _refuse(path, "is a detached NRRD header (its `data file:` field names another file)")


def _looks_like_metaimage(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0]
    match = _META_KEY.match(first)
    return bool(match) and match.group(1).lower() in _META_FIRST_KEYS


def _check_metaimage(path: Path, head: bytes) -> None:
    for line in head.split(b"\n"):
        match = _META_KEY.match(line.rstrip(b"\r"))
        if match and match.group(1).lower() == b"elementdatafile":
            if match.group(2).strip().upper() != b"LOCAL":
                _refuse(path, "is a MetaImage header whose ElementDataFile names another file")
            return  # ElementDataFile is the last header field; the pixels follow
    if len(head) >= HEADER_BYTES:
        _refuse(path, f"has a MetaImage header longer than {HEADER_BYTES // 1024} KiB")


def _check_nifti(path: Path, head: bytes) -> None:
    if path.name.lower().endswith(".gz") or head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(552)
        except (OSError, EOFError):
            return  # not gzip after all: the reader reports the corrupt file
    if head[344:348] == b"ni1\0" or head[4:8] == b"ni2\0":
        _refuse(path, "is a two-file NIfTI header (its voxels are in a separate .img file)")
    single_file = head[344:348] == b"n+1\0" or head[4:8] == b"n+2\0"
    analyze = len(head) >= 348 and 348 in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big"))
    if analyze and not single_file:
        _refuse(path, "is an Analyze 7.5 header (its voxels are in a separate .img file)")


def _check_dicom(path: Path) -> None:
    import pydicom

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - an unreadable preamble is the reader's error to report
        return
    if str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
        _refuse(path, "is a DICOMDIR (an index of other DICOM files)")


def _check_tiff(path: Path) -> None:
    import tifffile

    try:
        with tifffile.TiffFile(path, _multifile=False) as tif:
            description = tif.pages.first.description or ""
            mmstack = bool(getattr(tif, "is_mmstack", False))
    except Exception:  # noqa: BLE001 - a damaged TIFF is the reader's error to report
        return
    if mmstack:
        _refuse(path, "is a MicroManager stack (its series continues in other files)")
    if "<OME" in description and re.search(r"<(?:\w+:)?UUID\b[^>]*\bFileName\s*=", description):
        _refuse(path, "is a multi-file OME-TIFF (its XML names other files)")
