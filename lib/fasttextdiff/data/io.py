"""Read any supported medical image into one `Image` record, and write masks back in its geometry.

Why one reader: the CLI, the trainer and the MONAI Label server all receive files of many
kinds (PNG X-rays, DICOM radiographs, NIfTI/NRRD volumes, DICOM series). Funnelling them through
`read_image` gives the model one array layout and keeps the geometry needed to write the
segmentation back so that it overlays the input exactly. Header sizes are checked before pixels
are decoded, so a hostile or broken file fails fast with a sentence and bounded memory.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasttextdiff.errors import ImageReadError

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
        raise ImageReadError(f"{path.name} is {'x'.join(map(str, plane))} pixels; images need at least {MIN_SIDE} pixels per side.")
    if any(s > MAX_SIDE for s in shape_xyz):
        raise ImageReadError(f"{path.name} has a side of {max(shape_xyz)} pixels, above the limit of {MAX_SIDE}.")
    if int(np.prod([int(s) for s in shape_xyz], dtype=np.int64)) > MAX_VOXELS:
        raise ImageReadError(f"{path.name} has more than {MAX_VOXELS} voxels, which is more than we can hold in memory.")


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
        from fasttextdiff.data.references import check_self_contained

        check_self_contained(path)
    if not path.exists():
        raise ImageReadError(f"image {path} does not exist.")
    if path.is_dir():
        return _read_dicom_series(path)
    if path.stat().st_size == 0:
        raise ImageReadError(f"image {path} is an empty (zero-byte) file.")
    ext = _extension(path)
    if ext in ITK_EXTENSIONS:
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


# ---------------------------------------------------------------- 2D raster (PIL / tifffile)


def _flat_image(array: np.ndarray) -> Image:
    return Image(array=array, spacing=(1.0, 1.0), origin=(0.0, 0.0), direction=_IDENTITY_2D, is_volume=False)


def _read_raster(path: Path) -> Image:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(path) as pil:
            _check_size(path, pil.size)
            pil.load()
            array = _pil_to_array(pil)
    except ImageReadError:
        raise
    except PILImage.DecompressionBombError as exc:
        raise ImageReadError(f"{path.name} has more pixels than PIL decodes safely, above the limit for 2D images.") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path.name} is corrupt or truncated and cannot be decoded ({exc}).") from exc
    return _flat_image(array)


def _pil_to_array(pil) -> np.ndarray:
    """Grayscale stays 2D (8/16/32-bit kept), colour becomes RGB; alpha is dropped."""
    mode = pil.mode
    if mode == "P":
        pil = pil.convert("RGBA")
        mode = "RGBA"
    if mode in ("1", "LA", "La"):
        pil = pil.convert("L")
    elif mode in ("RGBA", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        pil = pil.convert("RGB")
    array = np.asarray(pil)
    if array.ndim == 3 and array.shape[2] == 3 and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
        array = array[..., 0]  # a grey image saved as RGB (or a grey palette) is grey
    return np.ascontiguousarray(array)


def _read_tiff(path: Path) -> Image:
    """tifffile keeps 16-bit and float samples and reads multi-page stacks as volumes."""
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
    raise ImageReadError(f"{path.name} has {array.ndim} dimensions {array.shape}; only 2D images and 3D stacks can be segmented.")


# ---------------------------------------------------------------- DICOM


def _invert(array: np.ndarray) -> np.ndarray:
    """MONOCHROME1 -> MONOCHROME2 (bright = dense) within the same value range and dtype."""
    lo, hi = array.min(), array.max()
    if np.issubdtype(array.dtype, np.floating):
        return (hi + lo) - array
    wide = (np.int64(hi) + np.int64(lo)) - array.astype(np.int64)  # no unsigned wrap-around
    return wide.astype(array.dtype)


def _dicom_header_geometry(path: Path, ds, plane: tuple[int, int], frames: int) -> tuple[tuple, tuple, tuple]:
    """SimpleITK/GDCM's view of the file's geometry, so written masks match what viewers load.

    Falls back to PixelSpacing (or ImagerPixelSpacing) when GDCM cannot parse the header or
    sees a different grid than pydicom decoded.
    """
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = tuple(reader.GetSize())
        if size[:2] == (plane[1], plane[0]) and (len(size) == 2 or size[2] == frames):
            return tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection())
    except RuntimeError:
        pass
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        sx, sy = (float(spacing[1]), float(spacing[0])) if spacing and float(spacing[0]) > 0 else (1.0, 1.0)
    except (TypeError, ValueError, IndexError):
        sx, sy = 1.0, 1.0
    return (sx, sy), (0.0, 0.0), _IDENTITY_2D


def _read_dicom_file(path: Path) -> Image:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as exc:
        raise ImageReadError(f"{path.name} is not a readable DICOM file ({exc}).") from exc
    if "PixelData" not in ds:
        raise ImageReadError(f"{path.name} is a DICOM file without pixel data (e.g. a report or structure set).")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_size(path, (cols, rows, frames))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    colour = int(ds.get("SamplesPerPixel", 1)) > 1
    try:
        array = _decode_dicom_pixels(ds, colour, photometric)
    except Exception as exc:  # pydicom cannot decode (compressed, damaged): let GDCM try
        array = _decode_with_gdcm(path, exc, colour)
    if photometric == "MONOCHROME1":
        array = _invert(array)
    spacing, origin, direction = _dicom_header_geometry(path, ds, (rows, cols), frames)
    if frames > 1 and len(spacing) == 2:
        spacing, origin, direction = spacing + (1.0,), origin + (0.0,), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    if frames > 1 and not colour:
        return Image(array=np.ascontiguousarray(array), spacing=spacing, origin=origin, direction=direction, is_volume=True)
    if frames > 1:
        raise ImageReadError(f"{path.name} is a multi-frame colour DICOM (e.g. a cine loop), which cannot be segmented.")
    return Image(array=np.ascontiguousarray(array), spacing=spacing, origin=origin, direction=direction, is_volume=False)


def _decode_dicom_pixels(ds, colour: bool, photometric: str) -> np.ndarray:
    from pydicom.pixel_data_handlers.util import apply_modality_lut, convert_color_space

    array = ds.pixel_array
    if colour:
        if photometric.startswith("YBR") and "FULL" in photometric:
            array = convert_color_space(array, photometric, "RGB")
        return np.asarray(array)
    out = apply_modality_lut(array, ds)  # RescaleSlope/Intercept or a Modality LUT
    return np.asarray(out, dtype=np.float32) if out.dtype == np.float64 else np.asarray(out)


def _decode_with_gdcm(path: Path, cause: Exception, colour: bool) -> np.ndarray:
    import SimpleITK as sitk

    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # GDCM applies rescale itself
    except RuntimeError as exc:
        raise ImageReadError(f"{path.name} has pixel data that cannot be decoded ({cause}).") from exc
    if colour:
        return array[0] if array.ndim == 4 and array.shape[0] == 1 else array
    return array[0] if array.ndim == 3 and array.shape[0] == 1 else array


def _read_dicom_series(folder: Path) -> Image:
    import SimpleITK as sitk

    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    except RuntimeError:
        series_ids = ()
    if not series_ids:
        raise ImageReadError(f"folder {folder} contains no DICOM series.")
    files_per_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
    if len(series_ids) > 1:
        logger.warning("folder %s holds %d DICOM series; reading the largest (%s)", folder, len(series_ids), chosen)
    files = list(files_per_series[chosen])
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
        raise ImageReadError(f"the DICOM series in {folder} has colour pixels; only grayscale volumes can be segmented.")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        itk_image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"the DICOM series in {folder} cannot be read ({str(exc).strip().splitlines()[-1]}).") from exc
    array = sitk.GetArrayFromImage(itk_image)
    if info.HasMetaDataKey("0028|0004") and info.GetMetaData("0028|0004").strip().upper() == "MONOCHROME1":
        array = _invert(array)
    image = _from_itk(itk_image, array)
    _check_finite(folder, image.array)
    image.path = str(folder)
    return image


# ---------------------------------------------------------------- NIfTI / NRRD / MHA (SimpleITK)


def _from_itk(itk_image, array: np.ndarray) -> Image:
    spacing, origin, direction = tuple(itk_image.GetSpacing()), tuple(itk_image.GetOrigin()), tuple(itk_image.GetDirection())
    is_volume = itk_image.GetDimension() == 3 and itk_image.GetSize()[2] > 1
    if itk_image.GetDimension() == 3 and not is_volume:
        array = array[0]  # one slice: a 2D image that keeps its 3D header
    return Image(array=np.ascontiguousarray(array), spacing=spacing, origin=origin, direction=direction, is_volume=is_volume)


# deflate cannot compress better than about 1032:1, so a file can hold at most this many voxel
# bytes per byte of its own size; NIfTI/NRRD/MHA readers allocate the whole array before reading
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


def _read_itk(path: Path) -> Image:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(f"{path.name} is corrupt or not a valid {_extension(path)} file.") from exc
    dim, size, comps = reader.GetDimension(), tuple(reader.GetSize()), reader.GetNumberOfComponents()
    if dim == 4 and size[3] == 1:
        reader.SetExtractIndex((0, 0, 0, 0))
        reader.SetExtractSize((size[0], size[1], size[2], 0))  # drop a singleton time axis
        size = size[:3]
    elif dim > 3:
        raise ImageReadError(f"{path.name} is a {dim}D image of size {size}; only 2D images and 3D volumes can be segmented.")
    _check_size(path, size)
    _check_plausible_length(path, int(np.prod([int(s) for s in size], dtype=np.int64)) * comps)
    if comps != 1 and not (comps in (3, 4) and (dim == 2 or size[2] == 1)):
        raise ImageReadError(f"{path.name} has {comps} values per voxel (a vector or tensor volume); only scalar volumes can be segmented.")
    if _extension(path) in (".nii", ".nii.gz") and comps == 1:
        return _read_nifti(path, reader, size)
    try:
        itk_image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"{path.name} is truncated or corrupt; its pixel data cannot be read.") from exc
    array = sitk.GetArrayFromImage(itk_image)
    if comps == 4:
        array = array[..., :3]
    return _from_itk(itk_image, array)


def _read_nifti(path: Path, reader, size: tuple[int, ...]) -> Image:
    """NIfTI pixels via nibabel, geometry via SimpleITK.

    ITK's NIfTI reader silently zero-fills truncated files and replaces NaN/Inf by 0; nibabel
    reads the same voxels in the same storage order (scaling applied) but refuses short data.
    """
    import nibabel

    from nibabel.filebasedimages import ImageFileError

    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except (OSError, EOFError, ValueError, zlib.error, ImageFileError) as exc:
        raise ImageReadError(f"{path.name} is truncated or corrupt; its pixel data cannot be read.") from exc
    if data.size != int(np.prod(size)):
        raise ImageReadError(f"{path.name} holds {data.size} voxels but its header describes {int(np.prod(size))}.")
    array = np.ascontiguousarray(data.reshape(size, order="F").T)  # (x, y, z) storage -> (z, y, x)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    dims = len(size)
    full = reader.GetDimension()
    spacing, origin = tuple(reader.GetSpacing())[:dims], tuple(reader.GetOrigin())[:dims]
    direction = tuple(np.asarray(reader.GetDirection()).reshape(full, full)[:dims, :dims].ravel().tolist())
    is_volume = dims == 3 and size[2] > 1
    if dims == 3 and not is_volume:
        array = array[0]
    return Image(array=array, spacing=spacing, origin=origin, direction=direction, is_volume=is_volume)


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
        raise ValueError(f"cannot write an array of shape {array.shape} in the geometry of an image of shape {tuple(expected)}.")


def write_image(path: str | os.PathLike, array, like: Image) -> Path:
    """Write a mask or map in `like`'s grid and geometry; the format follows the extension.

    `.nii/.nii.gz/.nrrd/.mha/.mhd` keep spacing/origin/direction (2D or 3D); `.png` takes 2D
    uint8/uint16 (bool becomes 0/255, floats in [0, 1] are scaled to 0..255); `.tif` any dtype.
    The file is written to a temporary name and renamed, so readers never see half a file.
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise ValueError(f"cannot write {path.name}: supported output formats are {', '.join(WRITE_EXTENSIONS)}.")
    raw = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    _check_write_shape(raw, like)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=ext)
    os.close(fd)
    try:
        if ext in ITK_EXTENSIONS:
            _write_itk(tmp, _as_writable(raw), like)
        elif ext == ".png":
            _write_png(tmp, raw, like)
        else:
            import tifffile

            tifffile.imwrite(tmp, _as_writable(raw))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_png(tmp: str, raw: np.ndarray, like: Image) -> None:
    from PIL import Image as PILImage

    if like.is_volume:
        raise ValueError("a volume cannot be written as PNG; use .nii.gz, .nrrd or .mha.")
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
