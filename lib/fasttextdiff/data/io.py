"""Read any supported medical image into one `Image` record, and write masks back in its geometry.

Why one reader: the CLI, the trainer and the MONAI Label server all receive files of many
kinds (PNG X-rays, DICOM radiographs, NIfTI/NRRD volumes, DICOM series). Funnelling them through
`read_image` gives the model one array layout and keeps the geometry needed to write the
segmentation back so that it overlays the input exactly.

MONAI's readers decode the pixels (PILReader, ITKReader/GDCM for DICOM, NRRD and MHA, NibabelReader
for NIfTI). This module is the thin layer around them: header sizes are checked before any pixel
is decoded (a hostile or broken file fails fast with a sentence and bounded memory), and the
geometry is kept exactly as stored.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasttextdiff.utils.atomic import atomic_path
from fasttextdiff.data.references import check_self_contained
from fasttextdiff.utils.errors import ImageReadError

logger = logging.getLogger(__name__)

MIN_SIDE = 8  # smaller images cannot pass the U-Net's downsampling levels meaningfully
MAX_SIDE = 16384  # per axis; anything larger is almost surely a broken or hostile header
MAX_VOXELS = 2**31  # bounds memory: 2**31 float32 voxels are already 8 GiB

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
ITK_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_EXTENSIONS = (".png", ".tif", ".tiff") + ITK_EXTENSIONS

_IDENTITY_2D = (1.0, 0.0, 0.0, 1.0)


@dataclass
class Image:
    """Pixels plus the geometry needed to put a mask back where it belongs.

    `array` is `(H, W)` grayscale, `(H, W, 3)` colour, or `(Z, Y, X)` for a volume (SimpleITK order).
    `spacing`/`origin` are in SimpleITK order (x, y[, z]) and `direction` is flattened as SimpleITK
    gives it. A 2D image that was stored as a one-slice volume (a DICOM radiograph, a 1-slice NIfTI)
    has `is_volume=False` but keeps its 3D geometry, so `write_image` reproduces the file's header.
    """

    array: np.ndarray
    spacing: tuple
    origin: tuple
    direction: tuple
    is_volume: bool
    path: str | None = None

    @property
    def is_color(self) -> bool:
        return not self.is_volume and self.array.ndim == 3

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(H, W) of one 2D image or one slice of a volume."""
        return tuple(self.array.shape[1:3]) if self.is_volume else tuple(self.array.shape[:2])

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0]) if self.is_volume else 1


def supported_extensions() -> tuple[str, ...]:
    """File name endings `read_image` understands (a folder of DICOM files works too)."""
    return RASTER_EXTENSIONS + DICOM_EXTENSIONS + ITK_EXTENSIONS


def _extension(path: Path) -> str:
    name = path.name.lower()
    for double in (".nii.gz",):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for a folder (DICOM series) or a format that can hold a 3D volume (NIfTI/NRRD/MHA)."""
    path = Path(path)
    return path.is_dir() or _extension(path) in ITK_EXTENSIONS


def _is_dicom_file(path: Path) -> bool:
    if _extension(path) in DICOM_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _check_size(path: Path, shape_xyz: tuple[int, ...]) -> None:
    """Refuse absurd sizes from the header, before any pixel is decoded."""
    plane = shape_xyz[:2]
    if any(s < MIN_SIDE for s in plane):
        raise ImageReadError(f"{path.name} is {'x'.join(map(str, plane))} pixels; images need at least {MIN_SIDE} "
                             "pixels per side.")
    if any(s > MAX_SIDE for s in shape_xyz):
        raise ImageReadError(f"{path.name} has a side of {max(shape_xyz)} pixels, above the limit of {MAX_SIDE}.")
    if int(np.prod([int(s) for s in shape_xyz], dtype=np.int64)) > MAX_VOXELS:
        raise ImageReadError(f"{path.name} has more than {MAX_VOXELS} voxels, which is more than we can hold in "
                             "memory.")


# deflate cannot compress better than about 1032:1, so a file can hold at most this many voxel
# bytes per byte of its own size; readers (NIfTI, NRRD, MHA, DICOM) allocate the whole array first
MAX_COMPRESSION_RATIO = 1100


def _check_plausible_length(path: Path, min_data_bytes: int) -> None:
    """Refuse a header that describes far more voxels than the file could hold even compressed,
    before a reader allocates them (a 200-byte file must not make the server allocate 2 GB)."""
    if _extension(path) in (".nhdr", ".mhd"):
        return  # detached headers: the voxels live in another file
    size = path.stat().st_size
    if min_data_bytes > MAX_COMPRESSION_RATIO * size:
        raise ImageReadError(f"{path.name} is truncated or corrupt: its header describes {min_data_bytes} bytes of "
                             f"voxels but the file has only {size} bytes.")


def _check_finite(path: Path, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ImageReadError(f"{path.name} contains NaN or infinite values; clean the image before segmenting it.")
    if np.iscomplexobj(array):
        raise ImageReadError(f"{path.name} holds complex-valued pixels, which cannot be segmented.")


def read_image(path: str | os.PathLike, allow_external_data: bool = False) -> Image:
    """Read a 2D image, a DICOM file or series, or a NIfTI/NRRD/MHA volume (see the module doc).
    Files that name other files (detached NRRD/MHD headers, DICOMDIR, ...) are refused unless
    `allow_external_data` (see data/references.py)."""
    path = Path(path)
    if not allow_external_data:
        check_self_contained(path)
    if not path.exists():
        raise ImageReadError(f"image {path} does not exist.")
    if path.is_dir():
        image = _read_dicom_series(path)
    elif path.stat().st_size == 0:
        raise ImageReadError(f"image {path} is an empty (zero-byte) file.")
    elif (ext := _extension(path)) in ITK_EXTENSIONS:
        image = _read_itk(path)
    elif ext in (".tif", ".tiff"):
        image = _read_tiff(path)
    elif ext in RASTER_EXTENSIONS:
        image = _read_raster(path)
    elif _is_dicom_file(path):
        image = _read_dicom_file(path)
    else:
        raise ImageReadError(
            f"{path.name} has an unsupported format {ext or '(no extension)'}; supported: "
            f"{', '.join(supported_extensions())} or a DICOM series folder."
        )
    _check_finite(path, image.array)
    image.path = str(path)
    return image


def _decode(reader, source, failure: str) -> tuple[np.ndarray, object]:
    """Pixels through a MONAI reader's read + get_data (what `LoadImage` runs), kept in the stored dtype.

    Why not `LoadImage` itself: it widens uint16 to int32 (torch lacks uint16 maths), doubling the
    memory of every 16-bit radiograph. Returns the array and the reader's native image (its geometry).
    """
    try:
        native = reader.read(str(source))
        array, _ = reader.get_data(native)
    except Exception as exc:  # readers raise many types for damaged files
        raise ImageReadError(failure) from exc
    if type(array) is not np.ndarray:  # ITKReader's view of ITK's buffer: views of it do not keep that alive
        array = np.array(array)
    return array, native


def _itk_geometry(itk_image, dims: int) -> tuple[tuple, tuple, tuple]:
    """Spacing, origin and direction of an ITK image (first `dims` axes), exactly as stored."""
    import itk

    full = itk_image.GetImageDimension()
    direction = np.asarray(itk.array_from_matrix(itk_image.GetDirection())).reshape(full, full)[:dims, :dims]
    return (tuple(float(s) for s in itk_image.GetSpacing())[:dims],
            tuple(float(o) for o in itk_image.GetOrigin())[:dims],
            tuple(direction.ravel().tolist()))


def _itk_reader(**kwargs):
    from monai.data import ITKReader

    return ITKReader(reverse_indexing=True, affine_lps_to_ras=False, **kwargs)  # arrays in (Z, Y, X) order


def _from_stack(array: np.ndarray, geometry: tuple[tuple, tuple, tuple]) -> Image:
    """(Z, Y, X[, C]) pixels with 3D geometry; one slice is a 2D image that keeps its 3D header."""
    is_volume = array.shape[0] > 1
    return Image(array if is_volume else array[0], *geometry, is_volume=is_volume)


# ---------------------------------------------------------------- 2D raster (MONAI PILReader / tifffile)


def _flat_image(array: np.ndarray) -> Image:
    return Image(array=array, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=_IDENTITY_2D, is_volume=False)


def _read_raster(path: Path) -> Image:
    from monai.data import PILReader
    from PIL import Image as PILImage

    def checked_grey_or_rgb(pil):  # PILReader calls this right after parsing the header
        _check_size(path, pil.size)
        return _grey_or_rgb(pil)

    reader = PILReader(converter=checked_grey_or_rgb, reverse_indexing=False)
    try:
        array, _ = reader.get_data(reader.read(str(path)))
    except ImageReadError:
        raise
    except PILImage.DecompressionBombError as exc:
        raise ImageReadError(f"{path.name} has more pixels than PIL decodes safely, above the limit for 2D "
                             "images.") from exc
    except (PILImage.UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if not _has_image_signature(path):
            raise ImageReadError(f"{path.name} is not an image: its content is not PNG, JPEG, TIFF or BMP data "
                                 f"({_content_hint(path)}).") from exc
        raise ImageReadError(f"{path.name} is corrupt or truncated and cannot be decoded ({exc}).") from exc
    if array.ndim == 3 and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
        array = array[..., 0]  # a grey image saved as RGB (or a grey palette) is grey
    return _flat_image(np.ascontiguousarray(array))


# file signatures of the raster formats PIL reads here (what a file that is "not an image" lacks)
_RASTER_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF8")
LABEL_PNG_KEY = "fasttextdiff-labels"  # PNG text chunk of a palette label PNG: its pixels are class indices
# colours of label values 0..7 in a palette PNG (0 black); higher values get greys, so any viewer shows them
LABEL_PALETTE = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240))


def _has_image_signature(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return True  # cannot tell: keep the decoder's own words
    return head.startswith(_RASTER_SIGNATURES)


def _content_hint(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return "unreadable"
    if not head:
        return "the file is empty"
    try:
        head.decode("utf-8")
        return "it looks like text"
    except UnicodeDecodeError:
        return "unknown binary data"


def _grey_or_rgb(pil):
    """Grayscale stays one channel (8/16/32-bit kept), colour becomes RGB; alpha is dropped. A palette
    label PNG we wrote (LABEL_PNG_KEY) keeps its class indices."""
    if pil.mode == "P" and pil.info.get(LABEL_PNG_KEY):
        return pil
    if pil.mode == "P":
        pil = pil.convert("RGBA")
    if pil.mode in ("1", "LA", "La"):
        return pil.convert("L")
    if pil.mode in ("RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return pil.convert("RGB")
    return pil


def _read_tiff(path: Path) -> Image:
    """tifffile, not MONAI: ITK's TIFF reader turns multi-page 16-bit stacks into 8-bit RGBA, PIL reads one page."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = tuple(int(s) for s in series.shape)
            axes = series.axes
            _check_size(path, tuple(reversed([s for a, s in zip(axes, shape) if a != "S"])))  # (X, Y, ...)
            array = series.asarray()
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        raise ImageReadError(f"{path.name} is corrupt or truncated and cannot be decoded ({exc}).") from exc
    array = np.squeeze(array)
    if array.ndim == 2:
        return _flat_image(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4) and "S" in axes:
        return _flat_image(np.ascontiguousarray(array[..., :3]))
    if array.ndim == 3:
        return Image(array=array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                     direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), is_volume=True)
    raise ImageReadError(f"{path.name} has {array.ndim} dimensions {array.shape}; only 2D images and 3D stacks can be "
                         "segmented.")


# ------------------------------------------------------------ DICOM (header: pydicom; pixels: MONAI ITKReader/GDCM)


def _read_dicom_file(path: Path) -> Image:
    """Header checks with pydicom (pixels deferred), then GDCM decodes: any transfer syntax, rescale
    slope/intercept and colour spaces applied, MONOCHROME1 inverted within its bit depth
    (2**BitsStored - 1 - v, so bright is dense), and the geometry viewers see."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="64 KB")  # large values, the pixels among them, stay on disk
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ImageReadError(f"{path.name} is not a readable DICOM file ({exc}).") from exc
    if "PixelData" not in ds:
        raise ImageReadError(f"{path.name} is a DICOM file without pixel data (e.g. a report or structure set).")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), frames)
    _check_size(path, shape)
    _check_plausible_length(path, int(np.prod(shape, dtype=np.int64)))  # at least a byte per pixel
    colour = int(ds.get("SamplesPerPixel", 1)) > 1
    if frames > 1 and colour:
        raise ImageReadError(f"{path.name} is a multi-frame colour DICOM (e.g. a cine loop), which cannot be "
                             "segmented.")
    array, native = _decode(_itk_reader(), path, f"{path.name} has pixel data that cannot be decoded.")
    if array.ndim == 2 + colour:  # GDCM returned one plane without a slice axis
        array = array[None]
    return _from_stack(array, _itk_geometry(native, native.GetImageDimension()))


def _read_dicom_series(folder: Path) -> Image:
    import itk
    import SimpleITK as sitk

    names = itk.GDCMSeriesFileNames.New()  # set up as MONAI's ITKReader does, so its series names match
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")
    names.SetDirectory(str(folder))
    series_ids = list(names.GetSeriesUIDs())
    if not series_ids:
        raise ImageReadError(f"folder {folder} contains no DICOM series.")
    files_per_series = {sid: list(names.GetFileNames(sid)) for sid in series_ids}
    chosen = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
    if len(series_ids) > 1:
        logger.warning("folder %s holds %d DICOM series; reading the largest (%s)", folder, len(series_ids), chosen)
    files = files_per_series[chosen]
    if len(files) == 1:
        return read_image(files[0])
    info = sitk.ImageFileReader()
    info.SetFileName(files[0])
    try:
        info.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(f"{Path(files[0]).name} in {folder} is not a readable DICOM file.") from exc
    size = info.GetSize()
    _check_size(folder, (size[0], size[1], len(files)))
    if info.GetNumberOfComponents() != 1:
        raise ImageReadError(f"the DICOM series in {folder} has colour pixels; only grayscale volumes can be "
                             "segmented.")
    array, native = _decode(_itk_reader(series_name=chosen), folder, f"the DICOM series in {folder} cannot be read.")
    return _from_stack(array, _itk_geometry(native, 3))


# ------------------------------------------------- NIfTI / NRRD / MHA (header: SimpleITK; pixels: MONAI readers)


def _read_itk(path: Path) -> Image:
    """SimpleITK parses the header (size checks, and the geometry for NIfTI), a MONAI reader decodes.

    NIfTI pixels come through MONAI's NibabelReader: ITK's NIfTI reader zero-fills truncated files
    and replaces NaN/Inf by 0, nibabel refuses short data and keeps the values.
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(f"{path.name} is corrupt or not a valid {_extension(path)} file.") from exc
    dim, size, comps = reader.GetDimension(), tuple(reader.GetSize()), reader.GetNumberOfComponents()
    if dim == 4 and size[3] == 1:
        dim, size = 3, size[:3]  # a singleton time axis is dropped
    elif dim > 3:
        raise ImageReadError(f"{path.name} is a {dim}D image of size {size}; only 2D images and 3D volumes can be "
                             "segmented.")
    _check_size(path, size)
    _check_plausible_length(path, int(np.prod([int(s) for s in size], dtype=np.int64)) * comps)
    if comps != 1 and not (comps in (3, 4) and (dim == 2 or size[2] == 1)):
        raise ImageReadError(f"{path.name} has {comps} values per voxel (a vector or tensor volume); only scalar "
                             "volumes can be segmented.")
    failure = f"{path.name} is truncated or corrupt; its pixel data cannot be read."
    if _extension(path) in (".nii", ".nii.gz") and comps == 1:
        from monai.data import NibabelReader

        data, _ = _decode(NibabelReader(squeeze_non_spatial_dims=True), path, failure)
        if data.size != int(np.prod(size)):
            raise ImageReadError(f"{path.name} holds {data.size} voxels but its header describes "
                                 f"{int(np.prod(size))}.")
        array = data.reshape(size, order="F").T  # (x, y, z) storage -> (z, y, x), no copy
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        full = reader.GetDimension()
        direction = np.asarray(reader.GetDirection()).reshape(full, full)[:dim, :dim]
        geometry = (tuple(reader.GetSpacing())[:dim], tuple(reader.GetOrigin())[:dim],
                    tuple(direction.ravel().tolist()))
    else:
        array, native = _decode(_itk_reader(), path, failure)
        geometry = _itk_geometry(native, dim)
        if native.GetImageDimension() == 4:
            array = array[0]
        if comps == 4:
            array = array[..., :3]
    if dim == 2:
        return Image(array=np.ascontiguousarray(array), spacing=geometry[0], origin=geometry[1], direction=geometry[2],
                     is_volume=False)
    return _from_stack(array, geometry)


# ---------------------------------------------------------------- writing


def _as_writable(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64, np.int32, np.uint32) and array.size:
        lo, hi = int(array.min()), int(array.max())
        if 0 <= lo and hi <= 255:
            return array.astype(np.uint8)
        if -(2**15) <= lo and hi < 2**15:
            return array.astype(np.int16)
        return array.astype(np.int32)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    return array


def _check_write_shape(array: np.ndarray, like: Image) -> None:
    expected = like.array.shape if like.is_volume else like.plane_shape
    if array.shape != tuple(expected):
        raise ValueError(f"cannot write an array of shape {array.shape} in the geometry of an image of shape "
                         f"{tuple(expected)}.")


def write_image(path: str | os.PathLike, array, like: Image, palette: bool = False) -> Path:
    """Write a mask or map in `like`'s grid and geometry; the format follows the extension.

    `.nii/.nii.gz/.nrrd/.mha/.mhd` keep spacing/origin/direction (2D or 3D); `.png` takes 2D
    uint8/uint16 (bool becomes 0/255, floats in [0, 1] are scaled to 0..255); `.tif` any dtype.
    `palette=True` writes a label mask (values 0..255) as a palette PNG: the pixels keep the class
    indices (read back as such) and any viewer shows them in colour (0 black, 1 red, 2 green, ...);
    other formats ignore it. The file is written to a temporary name and renamed, so readers never
    see half a file.
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise ValueError(f"cannot write {path.name}: supported output formats are {', '.join(WRITE_EXTENSIONS)}.")
    raw = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    _check_write_shape(raw, like)
    with atomic_path(path, suffix=ext) as tmp:
        if ext in ITK_EXTENSIONS:
            _write_itk(str(tmp), _as_writable(raw), like)
        elif ext == ".png":
            _write_png(str(tmp), raw, like, palette)
        else:
            import tifffile

            tifffile.imwrite(tmp, _as_writable(raw))
    return path


def _write_png(tmp: str, raw: np.ndarray, like: Image, palette: bool = False) -> None:
    from PIL import Image as PILImage
    from PIL.PngImagePlugin import PngInfo

    if like.is_volume:
        raise ValueError("a volume cannot be written as PNG; use .nii.gz, .nrrd or .mha.")
    if (
        palette
        and raw.ndim == 2
        and not np.issubdtype(raw.dtype, np.floating)
        and raw.size
        and raw.min() >= 0
        and raw.max() <= 255
    ):
        pil = PILImage.fromarray(raw.astype(np.uint8), mode="P")
        colours = list(LABEL_PALETTE) + [(v, v, v) for v in range(len(LABEL_PALETTE), 256)]
        pil.putpalette([c for rgb in colours for c in rgb])
        info = PngInfo()
        info.add_text(LABEL_PNG_KEY, "class indices")
        pil.save(tmp, format="PNG", pnginfo=info)
        return
    if raw.dtype == bool:
        raw = raw.astype(np.uint8) * 255
    elif np.issubdtype(raw.dtype, np.floating):
        if raw.size and (raw.min() < 0 or raw.max() > 1 or not np.isfinite(raw).all()):
            raise ValueError("float maps written as PNG must lie in [0, 1].")
        raw = np.round(raw * 255).astype(np.uint8)
    elif raw.size and (raw.min() < 0 or raw.max() > 65535):
        raise ValueError("integer arrays written as PNG must lie in 0..65535.")
    else:
        raw = raw.astype(np.uint8) if raw.max(initial=0) <= 255 else raw.astype(np.uint16)
    PILImage.fromarray(raw).save(tmp, format="PNG")


def _write_itk(tmp: str, array: np.ndarray, like: Image) -> None:
    import SimpleITK as sitk

    if len(like.spacing) == 3 and array.ndim == 2:
        array = array[None]  # back into the one-slice volume the image came from
    itk_image = sitk.GetImageFromArray(array, isVector=False)
    dims = itk_image.GetDimension()
    if len(like.spacing) != dims:
        raise ValueError(f"the reference image has {len(like.spacing)}D geometry but the array is {dims}D.")
    itk_image.SetSpacing(tuple(float(s) for s in like.spacing))
    itk_image.SetOrigin(tuple(float(o) for o in like.origin))
    itk_image.SetDirection(tuple(float(d) for d in like.direction))
    sitk.WriteImage(itk_image, tmp, useCompression=True)
