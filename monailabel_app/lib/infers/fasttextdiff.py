"""Infer task `fasttextdiff`: a report-conditioned segmentation of a 2D image or a 3D volume.

The report is the request's `text` param when given (non-empty), else the datastore's stored
report for that image, else empty (the model then segments without report guidance; the result
says which via `text_source`). Volumes are segmented slice by slice in batches and the label is
written in the input's own geometry. The result JSON carries the uncertainty summary (spread of
the predictions over `n_noise` noise draws); the uncertainty map itself is saved in the datastore
as label tag `uncertainty` for datastore images, or returned instead of the label with
`{"result": "uncertainty"}`.

The result file's format is MONAI Label's `result_extension` param (`.nrrd`, `.nii.gz`, `.nii`, `.mha`, or
`.png` for 2D images; others are refused with 400); without it, the input's own format (see
`result_extension()`), so `curl ... -o <id>_label<ext of the image>` names what it saves.

MONAI Label's BasicInferTask is built around MONAI transform chains and torch checkpoints; this
task owns its pipeline (the library's `Segmenter`), so it implements the plain `InferTask`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, Tuple, Union

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from fasttextdiff.text.encoder import text_sha256

from lib.configs.app_conf import AppConf
from lib.datastore import SCORE_KEY, UNCERTAINTY_TAG
from lib.model_manager import ModelManager
from lib.validation import bad_request, check_int, check_text

logger = logging.getLogger(__name__)

RESULTS = ("label", "uncertainty")
# what `result_extension` may ask for (MONAI Label's own infer param; its Writer defaults to the input's format)
RESULT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".mha", ".png")
_GEOMETRY_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".mha")  # keep spacing, origin, direction and float values


def _file_extension(path: str) -> str:
    """The extension of an image path in lower case (`.nii.gz` as one); "" for a folder (a DICOM series)."""
    if os.path.isdir(path):
        return ""
    name = os.path.basename(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def map_extension(image_path: str, is_volume: bool) -> str:
    """The format of a stored float map (the `uncertainty` label): the input's own where it keeps geometry and
    float values, else `.nii.gz` for a volume and `.nrrd` for a 2D image."""
    ext = _file_extension(image_path)
    if ext in _GEOMETRY_EXTENSIONS:
        return ext
    return ".nii.gz" if is_volume else ".nrrd"


def result_extension(requested: Any, image_path: str, is_volume: bool, kind: str = "label") -> str:
    """The result file's format. Requested (`result_extension`): one of RESULT_EXTENSIONS, `.png` for 2D only;
    anything else is a 400 with the reason. Absent (None or ""): the input's own format, as MONAI Label's Writer
    does: a `.nrrd` study gets `.nrrd` back, a PNG gets `.png`; a DICOM series or file gets `.nii.gz` (a 2D one
    `.nrrd`), another raster (JPEG, BMP, TIFF) `.png`, and an uncertainty map of a raster image `.nrrd` (PNG
    would round its float values to 256 grey levels)."""
    if requested in (None, ""):
        ext = _file_extension(image_path)
        if ext in _GEOMETRY_EXTENSIONS:
            return ext
        if is_volume or ext in (".dcm", ".dicom", ".ima", ""):
            return ".nii.gz" if is_volume else ".nrrd"
        return ".png" if kind == "label" else ".nrrd"
    shown = requested[:20] if isinstance(requested, str) else repr(requested)[:20]  # false, 0, a list: refused
    if requested not in RESULT_EXTENSIONS:
        raise bad_request(400, f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)} (.png for 2D images "
                               f"only), got {shown!r}")
    if requested == ".png" and is_volume:
        raise bad_request(400, "result_extension .png is for 2D images; this image is a volume: ask for .nrrd, "
                               ".nii.gz, .nii or .mha")
    return requested


def text_sha(text: str) -> str:
    """The report's hash kept beside its score (a prefix of the text cache's key)."""
    return text_sha256(text)[:16]


def score_entry(result: Any, text: str, identity: str | None, n_noise: int) -> Dict[str, Any]:
    """The image info kept under SCORE_KEY after a segmentation with the stored report: the mean
    uncertainty (`score`, strategy `uncertainty`) and how far the mask disagrees with the report
    (`report_mismatch`, strategy `report_mismatch`; None when the report names no findings), tagged
    with the model and text they were made from so that scoring redoes only what changed."""
    from fasttextdiff.text.findings import report_mismatch

    summary = result.summary
    return {"score": summary.get("uncertainty_mean"), "report_mismatch": report_mismatch(text, result.mask),
            "model": identity, "text_sha": text_sha(text), "n_noise": n_noise,
            "per_label": summary.get("uncertainty_per_label"), "ts": int(time.time())}


class FastTextDiffInfer(InferTask):
    """Segment one image with its report; see the module docstring for the text rule."""

    def __init__(self, conf: AppConf, manager: ModelManager, datastore: Callable[[], Any]):
        labels = {name: i for i, name in enumerate(conf.labels, start=1)}
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=labels,
            dimension=3,
            description="FastTextDiff: diffusion features + report text (2D images and volumes, slice-wise)",
            config={
                "text": "",  # the report; empty = use the one stored with the image
                "n_noise": conf.n_noise,  # noise draws for the uncertainty estimate
                "result": "label",  # or "uncertainty": return the uncertainty map instead
                "save_uncertainty": conf.save_uncertainty,
            },
        )
        self.conf = conf
        self.manager = manager
        self._datastore = datastore

    def is_valid(self) -> bool:
        return True  # listed while the model is prepared; requests then get 503 with the reason

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["model_state"] = self.manager.status.get("state")
        return info

    # ------------------------------------------------------------------ request -> text
    def _text(self, req: Dict[str, Any], image_id: str | None) -> tuple[str, str]:
        given = req.get("text")
        if given not in (None, ""):
            return check_text(given, self.conf.max_text_bytes), "request"
        if image_id:
            ds = self._datastore()
            stored = ds.get_image_info(image_id).get("text") if ds is not None else None
            if stored:
                return str(stored), "datastore"
        return "", "none"

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict]:
        started = time.time()
        req = dict(self._config)
        req.update(request)
        image_path = req.get("image")
        image_id = req.get("image_id") or req.get("_image_id")
        if not isinstance(image_path, str) or not image_path or not os.path.exists(image_path):
            raise bad_request(404, f"image {str(image_id or image_path)[:80]!r} is not in the datastore")
        result_kind = "label" if req.get("result") is None else req.get("result")  # JSON null: the default
        if result_kind not in RESULTS:
            raise bad_request(400, f"result must be one of {list(RESULTS)}, got {str(result_kind)[:40]!r}")
        n_noise = check_int(req.get("n_noise", self.conf.n_noise), "n_noise", 1, 32)
        text, source = self._text(req, image_id)

        from fasttextdiff.data.io import read_image

        t0 = time.time()
        image = read_image(image_path)
        t_read = time.time() - t0
        segmenter, identity = self.manager.segmenter()
        t0 = time.time()
        result = segmenter.segment(image, text, n_noise=n_noise)
        t_infer = time.time() - t0

        t0 = time.time()
        ext = result_extension(req.get("result_extension"), image_path, bool(image.is_volume), result_kind)
        from fasttextdiff.data.io import write_image

        results = self.manager.paths.work / "results"  # not /tmp: a client on this machine saves there by name
        results.mkdir(parents=True, exist_ok=True)
        out = tempfile.NamedTemporaryFile(suffix=ext, prefix="fasttextdiff-", dir=results, delete=False).name
        if result_kind == "uncertainty":
            write_image(out, result.uncertainty.astype("float32"), like=image)
        else:
            write_image(out, result.mask.astype("uint8"), like=image)

        summary = dict(result.summary)
        uncertainty_info: Dict[str, Any] = {
            "mean": summary.get("uncertainty_mean"),
            "per_label": summary.get("uncertainty_per_label"),
            "n_noise": n_noise,
        }
        ds = self._datastore()
        if image_id and ds is not None and result_kind == "label" and bool(req.get("save_uncertainty")) \
                and ds.get_image_uri(image_id):
            map_ext = map_extension(image_path, bool(image.is_volume))  # a float map, whatever the result's format
            unc_file = tempfile.NamedTemporaryFile(suffix=map_ext, dir=results, delete=False).name
            try:
                write_image(unc_file, result.uncertainty.astype("float32"), like=image)
                # unchecked (we made this file ourselves), atomic and serialised with the other writes
                ds.store_label(image_id, unc_file, UNCERTAINTY_TAG, {"model": identity, "kind": "uncertainty"})
                uncertainty_info["map"] = {"label": image_id, "tag": UNCERTAINTY_TAG,
                                           "url": f"/datastore/label?label={image_id}&tag={UNCERTAINTY_TAG}"}
            finally:
                os.unlink(unc_file)
        if image_id and ds is not None and source == "datastore" and hasattr(ds, "update_image_info_internal"):
            # the same number the scoring method computes: keep it, so scoring skips this image
            ds.update_image_info_internal(image_id, {SCORE_KEY: score_entry(result, text, identity, n_noise)})
        t_write = time.time() - t0

        labels = summary.get("labels") or {n: i for i, n in enumerate(segmenter.labels, start=1)}
        result_json = {
            "label_names": labels,
            "labels": labels,
            "result": result_kind,
            "text_source": source,
            "text_chars": len(text),
            "uncertainty": uncertainty_info,
            "foreground_fraction": summary.get("foreground_fraction"),
            "model": identity,
            "shape": list(image.array.shape),
            "is_volume": bool(image.is_volume),
            "latencies": {"read": round(t_read, 3), "infer": round(t_infer, 3), "write": round(t_write, 3),
                          "total": round(time.time() - started, 3)},
        }
        logger.info("infer %s: %s, text from %s (%d chars), %.2fs", image_id or "upload",
                    "volume" if image.is_volume else "2D", source, len(text), time.time() - started)
        return out, result_json
