"""The bad inputs the reliability tests send, in one place: crafted image files, report texts,
request parameters, path-traversal ids and tags, and the answer each must get.

The tests (`tests/test_reliability_*.py`) run every case against the real server, the CLI or the
library and assert the expected answer; the table in docs/RELIABILITY.md is generated from these
same lists with the answers a run observed: `python tests/reliability_cases.py --update-doc` runs
tests/reliability/test_reliability_inputs.py, collects the answers and rewrites the table. The tests never write
the doc: they compare it with what they observed and fail when it is stale
(`--markdown` prints the cases with their expected answers only).

Each crafted file is built small: a "20000 x 20000" image is a valid header with a few bytes of
pixel data (a lying header), never 400 MB of pixels.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# ---------------------------------------------------------------------------------------------
# crafted files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, rows: int | None = None, seed: int = 0) -> bytes:
    """A grayscale 8-bit PNG whose header says width x height; only `rows` rows of pixels follow
    (all of them when None). A short IDAT is a lying header."""
    rows = height if rows is None else rows
    rng = np.random.default_rng(seed)
    raw = b"".join(b"\x00" + rng.integers(0, 255, width, dtype=np.uint8).tobytes() for _ in range(rows))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def nifti_header(dims: tuple[int, ...], datatype: int = 2, bitpix: int = 8) -> bytes:
    """A 348-byte NIfTI-1 header (+4 bytes extension flag) for an image of `dims` (x, y, z, ...)."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    dim = [len(dims)] + list(dims) + [1] * (7 - len(dims))
    struct.pack_into("<8h", hdr, 40, *dim)
    struct.pack_into("<h", hdr, 70, datatype)
    struct.pack_into("<h", hdr, 72, bitpix)
    struct.pack_into("<8f", hdr, 76, 1.0, *([1.0] * 7))  # pixdim
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    struct.pack_into("<h", hdr, 254, 0)  # sform code
    hdr[344:348] = b"n+1\x00"
    return bytes(hdr) + b"\x00\x00\x00\x00"


def nifti_bytes(array: np.ndarray, gz: bool = True) -> bytes:
    import nibabel

    img = nibabel.Nifti1Image(array, np.eye(4))
    data = img.to_bytes()
    return gzip.compress(data, mtime=0) if gz else data


def _good_png() -> bytes:
    return png_bytes(32, 32)


def _dicom_huge() -> bytes:
    """A DICOM file whose header says 20000 x 20000 pixels, with 64 bytes of pixel data."""
    import io

    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "OT", 20000, 20000
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = b"\x00" * 64
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


@dataclass(frozen=True)
class FileCase:
    """A crafted image file; `expect` is the HTTP status of an upload (and of an infer on it);
    `words` must appear in the reason (any of them)."""

    name: str
    filename: str
    build: Callable[[], bytes]
    expect: int
    words: tuple[str, ...]
    note: str = ""
    upload_words: tuple[str, ...] = ()  # when the datastore upload answers differently (e.g. a type it does not store)


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _nan_volume() -> bytes:
    a = np.zeros((16, 16, 4), np.float32)
    a[3, 4, 1] = np.nan
    return nifti_bytes(a)


def _inf_volume() -> bytes:
    a = np.zeros((16, 16, 4), np.float32)
    a[0, 0, 0] = np.inf
    return nifti_bytes(a)


FILE_CASES: list[FileCase] = [
    FileCase("zero-byte PNG", "empty.png", lambda: b"", 415, ("zero-byte", "empty")),
    FileCase("zero-byte NIfTI", "empty.nii.gz", lambda: b"", 415, ("zero-byte", "empty")),
    FileCase("truncated PNG (half the file)", "half.png", lambda: _good_png()[: len(_good_png()) // 2], 415,
             ("corrupt", "truncated")),
    FileCase("truncated NIfTI (gzip cut)", "half.nii.gz",
             lambda: _half(nifti_bytes(np.random.default_rng(0).integers(0, 999, (16, 16, 4)).astype(np.int16))), 415,
             ("corrupt", "truncated")),
    FileCase("PNG bytes named .nii.gz", "png_in_disguise.nii.gz", _good_png, 415, ("corrupt", "not a valid")),
    FileCase("NIfTI bytes named .png", "nifti_in_disguise.png", lambda: nifti_bytes(np.ones((16, 16, 4), np.int16)),
             415, ("nifti_in_disguise.png is not an image",)),
    FileCase("text file named .png", "notes.png", lambda: b"Patient report, not an image\n" * 4, 415,
             ("notes.png is not an image", "looks like text")),
    FileCase("executable named .exe", "tool.exe", lambda: b"MZ\x90\x00" + b"\x00" * 60, 415, ("unsupported",)),
    FileCase("4D NIfTI (8x8x8x2)", "four_d.nii.gz", lambda: nifti_bytes(np.zeros((8, 8, 8, 2), np.int16)), 415,
             ("4D",)),
    FileCase("NaN voxel", "nan.nii.gz", _nan_volume, 415, ("NaN",)),
    FileCase("Inf voxel", "inf.nii.gz", _inf_volume, 415, ("NaN or infinite",)),
    FileCase("1x1 PNG", "one_pixel.png", lambda: png_bytes(1, 1), 415, ("at least",)),
    FileCase("20000x20000 PNG header, 2 rows of pixels", "huge.png", lambda: png_bytes(20000, 20000, rows=2), 415,
             ("above the limit",), "refused from the header, before decoding"),
    FileCase("16000x16000 PNG header (under the side limit), 1 row", "bomb.png",
             lambda: png_bytes(16000, 16000, rows=1), 415, ("more pixels than", "truncated", "corrupt"),
             "PIL's decompression-bomb limit"),
    FileCase("20000x20000 NIfTI header, no voxels", "huge.nii.gz",
             lambda: gzip.compress(nifti_header((20000, 20000)), mtime=0), 415, ("above the limit",)),
    FileCase("16000x16000x8 NIfTI header, no voxels (2 GB described)", "liar.nii.gz",
             lambda: gzip.compress(nifti_header((16000, 16000, 8)), mtime=0), 415,
             ("truncated", "corrupt", "holds"), "memory stays bounded"),
    FileCase("NIfTI header 32x32x32 float, 100 bytes of voxels", "short.nii",
             lambda: nifti_header((32, 32, 32), datatype=16, bitpix=32) + b"\x00" * 100, 415,
             ("truncated", "corrupt", "holds")),
    FileCase("NRRD header 20000x20000, 16 bytes of data", "huge.nrrd",
             lambda: b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 20000 20000\nencoding: raw\n\n" + b"\x00" * 16,
             415, ("above the limit",)),
    FileCase("NRRD header 64x64x64, 16 bytes of data", "short.nrrd",
             lambda: b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 64 64 64\nencoding: raw\n\n" + b"\x00" * 16,
             415, ("truncated", "corrupt")),
    FileCase("NRRD gzip header 16000x16000x8, 20 bytes of data", "liar.nrrd",
             lambda: b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 16000 16000 8\nencoding: gzip\n\n"
             + gzip.compress(b"\x00" * 16, mtime=0), 415, ("truncated", "corrupt"), "memory stays bounded"),
    FileCase("DICOM header 20000x20000, 64 bytes of pixels", "huge.dcm", _dicom_huge, 415, ("above the limit",)),
]


# ---------------------------------------------------------------------------------------------
# files that name another file (detached data): refused before any reader opens the named path

SECRET_SIDE = 16  # the sentinel "secret" is a 16x16 uint8 raw file: a valid data file for these headers


def _nrrd(field: str) -> bytes:
    return (f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: {SECRET_SIDE} {SECRET_SIDE}\nencoding: raw\n"
            f"{field}\n\n").encode()


def _metaimage(target: str) -> bytes:
    return (f"ObjectType = Image\nNDims = 2\nDimSize = {SECRET_SIDE} {SECRET_SIDE}\nElementType = MET_UCHAR\n"
            f"ElementDataFile = {target}\n").encode()


def _analyze_header(magic: bytes) -> bytes:
    hdr = bytearray(nifti_header((SECRET_SIDE, SECRET_SIDE)))[:348]
    hdr[344:348] = magic
    return bytes(hdr)


def _dicomdir() -> bytes:
    import io

    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.FileSetID = "FUZZ"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def _ome_tiff(target: str) -> bytes:
    import io

    import tifffile

    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="16" SizeY="16" '
           'SizeC="1" SizeZ="2" SizeT="1"><Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
           '<TiffData IFD="0" PlaneCount="1"/>'
           f'<TiffData FirstZ="1" PlaneCount="1"><UUID FileName="{target}">urn:uuid:0000</UUID></TiffData>'
           '</Pixels></Image></OME>')
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16), np.uint8), description=xml, metadata=None)
    return buf.getvalue()


@dataclass(frozen=True)
class ReferenceCase:
    """A file whose header names `target` (the sentinel's absolute path, or a relative one)."""

    name: str
    filename: str
    build: Callable[[str], bytes]


REFERENCE_CASES: list[ReferenceCase] = [
    ReferenceCase("NRRD `data file:` absolute path", "abs.nrrd", lambda t: _nrrd(f"data file: {t}")),
    ReferenceCase("NRRD `datafile:` relative path", "rel.nrrd", lambda t: _nrrd("datafile: ../../secret.raw")),
    ReferenceCase("NRRD `data file: LIST`", "list.nrrd", lambda t: _nrrd("data file: LIST") + t.encode() + b"\n"),
    ReferenceCase("NRRD printf-style `data file`", "printf.nrrd", lambda t: _nrrd(f"data file: {t[:-4]}%d.raw 0 0 1")),
    ReferenceCase("NRRD header longer than 64 KiB, then `data file`", "long.nrrd",
                  lambda t: _nrrd("# " + "x" * 70000 + f"\ndata file: {t}")),
    ReferenceCase("NHDR detached header", "detached.nhdr", lambda t: _nrrd(f"data file: {t}")),
    ReferenceCase("MHD `ElementDataFile` absolute path", "abs.mhd", _metaimage),
    ReferenceCase("MHA `ElementDataFile` absolute path", "abs.mha", _metaimage),
    ReferenceCase("MetaImage header named .nii.gz", "meta.nii.gz", _metaimage),
    ReferenceCase("Analyze 7.5 header (.hdr)", "analyze.hdr", lambda t: _analyze_header(b"\0\0\0\0")),
    ReferenceCase("two-file NIfTI header named .nii", "pair.nii", lambda t: _analyze_header(b"ni1\0")),
    ReferenceCase("DICOMDIR", "DICOMDIR", lambda t: _dicomdir()),
    ReferenceCase("DICOMDIR named .dcm", "index.dcm", lambda t: _dicomdir()),
    ReferenceCase("multi-file OME-TIFF", "multi.ome.tif", _ome_tiff),
]


# ---------------------------------------------------------------------------------------------
# archives (session uploads with uncompress=true, DICOM series zips): members that leave the target


def tar_bytes(members: list[tuple], mode: str = "w") -> bytes:
    """A tar of (name, data | None, kind) members; kind "file", "dir", "symlink" or "hardlink"
    (data is then the link target), "fifo"."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = data
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(members: list[tuple]) -> bytes:
    """A zip of (name, data, kind) members; kind "file" or "symlink" (a Unix symlink entry)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, kind in members:
            info = zipfile.ZipInfo(name)
            if kind == "symlink":
                info.external_attr = (0o120777 << 16)
            zf.writestr(info, data)
    return buf.getvalue()


def escaping_archives(outside: str) -> list[tuple[str, str, bytes]]:
    """(case, file name, bytes) of archives whose members would land in `outside` (an absolute
    folder) or above the extraction folder, or are links to it."""
    x = b"x"
    return [
        ("tar member ../", "up.tar", tar_bytes([("../escaped.txt", x, "file")])),
        ("tar member ../../", "up2.tar", tar_bytes([("a/../../../escaped.txt", x, "file")])),
        ("tar member absolute", "abs.tar", tar_bytes([(f"{outside}/abs_escaped.txt", x, "file")])),
        ("tar.gz member ../", "up.tar.gz", tar_bytes([("../escaped.txt", x, "file")], mode="w:gz")),
        ("tar symlink to outside", "link.tar",
         tar_bytes([("link", outside, "symlink"), ("link/through.txt", x, "file")])),
        ("tar hardlink to a server file", "hard.tar", tar_bytes([("hard", f"{outside}/secret.raw", "hardlink")])),
        ("tar FIFO", "fifo.tar", tar_bytes([("pipe", None, "fifo")])),
        ("zip member ../", "up.zip", zip_bytes([("../escaped.txt", x, "file")])),
        ("zip member absolute", "abs.zip", zip_bytes([(f"{outside}/abs_escaped.txt", x, "file")])),
        ("zip member with backslashes", "win.zip", zip_bytes([("..\\..\\escaped.txt", x, "file")])),
        ("zip symlink member", "link.zip", zip_bytes([("link", outside.encode(), "symlink")])),
    ]


# ---------------------------------------------------------------------------------------------
# report texts (PUT /datastore/image/info, form field `info` = {"text": ...})

@dataclass(frozen=True)
class TextCase:
    name: str
    payload: bytes  # the raw form field value (JSON, possibly not UTF-8)
    expect: int
    words: tuple[str, ...] = ()


def _info(text: str) -> bytes:
    return json.dumps({"text": text}).encode("utf-8")


MAX_TEXT_BYTES = 65536  # the app's default --conf max_text_bytes

TEXT_CASES: list[TextCase] = [
    TextCase("empty report", _info(""), 200),
    TextCase("report in Chinese", _info("双肺感染，左上肺及右下肺两处病灶。"), 200),
    TextCase("report in Arabic with RTL mark", _info("عدوى رئوية ثنائية\u200f، منطقتان مصابتان."), 200),
    TextCase("report with emoji and combining marks", _info("lésion 🫁 ṡ̃ left lower lobe"), 200),
    TextCase("report of exactly the limit", _info("x" * MAX_TEXT_BYTES), 200),
    TextCase("report one byte over the limit", _info("x" * (MAX_TEXT_BYTES + 1)), 413, ("limit",)),
    TextCase("report of 900 kB", _info("x" * 900_000), 413, ("limit",)),
    TextCase("NUL character", _info("left\x00lung"), 400, ("control",)),
    TextCase("escape sequence (ANSI)", _info("\x1b[31mred\x1b[0m"), 400, ("control",)),
    TextCase("lone surrogate (JSON \\udc80)", b'{"text": "bad \\udc80 text"}', 400, ("Unicode", "UTF-8")),
    TextCase("Latin-1 bytes", b'{"text": "caf\xe9"}', 400, ("UTF-8",)),
    TextCase("invalid UTF-8 continuation", b'{"text": "\xc3\x28"}', 400, ("UTF-8",)),
    TextCase("text is a number", b'{"text": 42}', 400, ("string",)),
    TextCase("text is a list", b'{"text": ["a", "b"]}', 400, ("string",)),
    TextCase("info is not JSON", b'{"text": ', 400, ("JSON",)),
    TextCase("info is a JSON list", b'["text"]', 400, ("object", "JSON")),
]


# ---------------------------------------------------------------------------------------------
# upload formats and re-uploads: every format the CLI reads is accepted, under the user's file name

def _pil_bytes(fmt: str, mode: str = "L") -> bytes:
    import io

    from PIL import Image as PILImage

    pixels = (np.random.default_rng(1).random((40, 48)) * 255).astype(np.uint8)
    image = PILImage.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _itk_bytes(suffix: str) -> bytes:
    import tempfile

    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(np.random.default_rng(2).integers(-1000, 400, (4, 24, 20)).astype(np.int16))
    volume.SetSpacing((0.8, 0.7, 2.0))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"v{suffix}"
        sitk.WriteImage(volume, str(path))
        return path.read_bytes()


def _dicom_slice(z: int, series_uid: str, rows: int = 24, cols: int = 20, instance: str | None = None) -> bytes:
    import io

    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = instance or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "1.2.826.0.1.3680043.2.1125.9", series_uid
    ds.Rows, ds.Columns, ds.InstanceNumber = rows, cols, z + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.5 * z], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.8], 2.5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    pixels = np.random.default_rng(z).integers(-1000, 400, (rows, cols)).astype(np.int16)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def _dicom_series_zip() -> bytes:
    uid = "1.2.826.0.1.3680043.2.1125.9.1"
    return zip_bytes([(f"series/slice{z:02d}.dcm", _dicom_slice(z, uid), "file") for z in range(3)])


@dataclass(frozen=True)
class FormatCase:
    """An image in a format the CLI reads, uploaded to a new id: accepted (200)."""

    name: str
    filename: str
    build: Callable[[], bytes]


FORMAT_CASES: list[FormatCase] = [
    FormatCase("PNG", "fmt_png.png", _good_png),
    FormatCase("JPEG (.jpg)", "fmt_jpg.jpg", lambda: _pil_bytes("JPEG")),
    FormatCase("JPEG (.jpeg)", "fmt_jpeg.jpeg", lambda: _pil_bytes("JPEG")),
    FormatCase("TIFF (.tif)", "fmt_tif.tif", lambda: _pil_bytes("TIFF")),
    FormatCase("TIFF (.tiff)", "fmt_tiff.tiff", lambda: _pil_bytes("TIFF")),
    FormatCase("BMP", "fmt_bmp.bmp", lambda: _pil_bytes("BMP")),
    FormatCase("DICOM file (.dcm)", "fmt_dcm.dcm", lambda: _dicom_slice(0, "1.2.826.0.1.3680043.2.1125.9.2")),
    FormatCase("DICOM series (.zip of 3 slices)", "fmt_series.zip", _dicom_series_zip),
    FormatCase("NIfTI volume (.nii.gz)", "fmt_nifti.nii.gz", lambda: _itk_bytes(".nii.gz")),
    FormatCase("NRRD volume", "fmt_nrrd.nrrd", lambda: _itk_bytes(".nrrd")),
    FormatCase("MetaImage volume (.mha)", "fmt_mha.mha", lambda: _itk_bytes(".mha")),
]


@dataclass(frozen=True)
class ReuploadCase:
    """A second upload to the id `reup` (first uploaded as a 32x32 PNG with a report and a final label)."""

    name: str
    filename: str
    build: Callable[[], bytes]
    params: dict
    expect: int
    words: tuple[str, ...] = ()


REUPLOAD_CASES: list[ReuploadCase] = [
    ReuploadCase("existing id, no replace", "reup.png", lambda: png_bytes(32, 32, seed=3), {}, 409,
                 ("already exists", "replace")),
    ReuploadCase("file named like an existing id, no ?image=", "reup.png", lambda: png_bytes(32, 32, seed=3), {}, 409,
                 ("already exists",)),
    ReuploadCase("replace must be a boolean", "reup.png", lambda: png_bytes(32, 32, seed=3), {"replace": "yes"}, 400,
                 ("true or false",)),
    ReuploadCase("replace, same size: report and label kept", "reup.png", lambda: png_bytes(32, 32, seed=4),
                 {"replace": True}, 200),
    ReuploadCase("replace with another format and size: label moved aside", "reup.jpeg",
                 lambda: _pil_bytes("JPEG"), {"replace": True}, 200),
]


# ---------------------------------------------------------------------------------------------
# request parameters

@dataclass(frozen=True)
class ParamCase:
    name: str
    route: str  # "infer" or "train"
    params: dict
    expect: int
    words: tuple[str, ...] = ()


PARAM_CASES: list[ParamCase] = [
    ParamCase("n_noise negative", "infer", {"n_noise": -1}, 400, ("n_noise",)),
    ParamCase("n_noise huge", "infer", {"n_noise": 10**12}, 400, ("n_noise",)),
    ParamCase("n_noise fractional", "infer", {"n_noise": 2.5}, 400, ("n_noise",)),
    ParamCase("n_noise boolean", "infer", {"n_noise": True}, 400, ("n_noise",)),
    ParamCase("n_noise a list", "infer", {"n_noise": [1, 2]}, 400, ("n_noise",)),
    ParamCase("n_noise NaN-ish string", "infer", {"n_noise": "NaN"}, 400, ("n_noise",)),
    ParamCase("result unknown", "infer", {"result": "everything"}, 400, ("result",)),
    ParamCase("result_extension a path", "infer", {"result_extension": "/../../etc/x"}, 400, ("result_extension",)),
    ParamCase("text a dict", "infer", {"text": {"a": 1}}, 400, ("string",)),
    ParamCase("unknown keys are ignored", "infer", {"zzz_unknown": 1, "n_noise": 1}, 200),
    ParamCase("max_epochs negative", "train", {"max_epochs": -3}, 400, ("max_epochs",)),
    ParamCase("max_epochs huge", "train", {"max_epochs": 10**9}, 400, ("max_epochs",)),
    ParamCase("max_epochs a string", "train", {"max_epochs": "ten"}, 400, ("max_epochs",)),
    ParamCase("lr zero", "train", {"lr": 0}, 400, ("lr",)),
    ParamCase("lr a string", "train", {"lr": "fast"}, 400, ("lr",)),
    ParamCase("train_batch_size zero", "train", {"train_batch_size": 0}, 400, ("train_batch_size",)),
]


# ---------------------------------------------------------------------------------------------
# path traversal in ids and tags

TRAVERSAL_IDS = ["../escaped", "../../etc/passwd", "/tmp/escaped", "a/../../b", "..", ".hidden", "a\\..\\b",
                 "%2e%2e%2fescaped", "x\x00y"]
TRAVERSAL_TAGS = ["../../x", "../final", "/abs", "a/b", "..", ".hidden"]


# ---------------------------------------------------------------------------------------------
# the table

# rows the tests add beside the case lists: (where, input, expected status)
EXTRA_ROWS: list[tuple[str, str, int]] = [
    ("upload image", "streamed (chunked) body over the upload limit", 413),
    ("upload image", "body over the upload limit (Content-Length)", 413),
]


def row_key(group: str, name: str) -> str:
    """The key of one table row in the observed answers."""
    return f"{group}: {name}"


def table_row(group: str, name: str, status: int | str, reason: str) -> str:
    """One line of the docs table, as `markdown` writes it."""
    reason = str(reason).replace("|", "\\|").replace("\n", " ")
    return f"| {group} | {name} | {status} | {reason[:160]} |"


def row_cases() -> list[tuple[str, str, int | str, tuple[str, ...]]]:
    """Every row of the table in order: (where, input, expected status, words of the expected reason)."""
    rows: list[tuple[str, str, int | str, tuple[str, ...]]] = []
    rows += [("upload image", c.name, c.expect, c.upload_words or c.words) for c in FILE_CASES]
    rows += [("infer on an uploaded file", c.name, c.expect, c.words) for c in FILE_CASES]
    rows += [("CLI `fasttextdiff segment`", c.name, "exit 2", c.words) for c in FILE_CASES]
    rows += [("upload format", c.name, 200, ()) for c in FORMAT_CASES]
    rows += [("re-upload", c.name, c.expect, c.words) for c in REUPLOAD_CASES]
    rows += [("report text (PUT /datastore/image/info)", c.name, c.expect, c.words) for c in TEXT_CASES]
    rows += [(f"{c.route} params", f"{c.name}: `{json.dumps(c.params)[:60]}`", c.expect, c.words) for c in PARAM_CASES]
    rows += [("image id (upload)", f"`{i!r}`", 400, ("invalid image id",)) for i in TRAVERSAL_IDS]
    rows += [("label tag (save label)", f"`{t!r}`", 400, ("invalid label tag",)) for t in TRAVERSAL_TAGS]
    rows += [(group, name, status, ()) for group, name, status in EXTRA_ROWS]
    return rows


def markdown(observed: dict[str, tuple[int | str, str]] | None = None) -> str:
    """The docs table: every case, the expected status and (when given) the observed status and reason."""
    observed = observed or {}
    lines = ["| where | input | status | response |", "|---|---|---|---|"]
    for group, name, expect, words in row_cases():
        status, reason = observed.get(row_key(group, name), (expect, "; ".join(f"… {w} …" for w in words) or "—"))
        lines.append(table_row(group, name, status, reason))
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- reliability-cases:begin -->", "<!-- reliability-cases:end -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "RELIABILITY.md"
UPDATE_COMMAND = ".venv/bin/python tests/reliability_cases.py --update-doc"
OBSERVED_ENV = "FASTTEXTDIFF_RELIABILITY_OBSERVED"  # set by --update-doc: where the tests put their answers


def doc_table(doc: Path = DOC) -> list[str]:
    """The lines of the generated table in `doc` (between the markers)."""
    text = doc.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        return []
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n").splitlines()


def update_doc(doc: Path, table: str) -> bool:
    """Replace the generated table in `doc` (between the markers); True when it changed."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table}{END}{tail}"
    if new != text:
        doc.write_text(new, encoding="utf-8")
        return True
    return False


def update_doc_from_a_run(doc: Path = DOC, pytest_args: list[str] | None = None) -> int:
    """Run tests/reliability/test_reliability_inputs.py, collect the answers it observed and write them into `doc`'s
    table. Nothing is written when a test fails or a row was not observed."""
    import os
    import subprocess
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="reliability-observed-") as folder:
        out = Path(folder) / "observed.json"
        env = dict(os.environ, **{OBSERVED_ENV: str(out)})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "tests/reliability/test_reliability_inputs.py", *(pytest_args or [])]
        print("running", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, cwd=repo, env=env)
        if done.returncode != 0:
            print(f"error: the tests failed (exit {done.returncode}); {doc} is left as it was", file=sys.stderr)
            return 1
        observed = {k: tuple(v) for k,
                    v in json.loads(out.read_text(encoding="utf-8")).items()} if out.exists() else {}
    missing = [row_key(g, n) for g, n, _, _ in row_cases() if row_key(g, n) not in observed]
    if missing:
        print(f"error: {len(missing)} row(s) were not observed (first: {missing[0]!r}); {doc} is left as it was",
              file=sys.stderr)
        return 1
    changed = update_doc(doc, markdown(observed))
    print(f"{doc}: {'table updated' if changed else 'already up to date'} ({len(observed)} observed rows)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the case table (expected answers)")
    parser.add_argument("--write-files", type=Path, help="write every crafted file into this folder")
    parser.add_argument("--update-doc", action="store_true",
                        help="run tests/reliability/test_reliability_inputs.py and write the answers it observed into "
                             "docs/RELIABILITY.md (the tests themselves only compare)")
    args = parser.parse_args(argv)
    if args.update_doc:
        return update_doc_from_a_run()
    if args.write_files:
        args.write_files.mkdir(parents=True, exist_ok=True)
        for c in FILE_CASES:
            (args.write_files / c.filename).write_bytes(c.build())
        print(f"wrote {len(FILE_CASES)} files to {args.write_files}")
    if args.markdown or not args.write_files:
        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
