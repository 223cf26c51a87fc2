#!/usr/bin/env python
"""The annotation loop a Slicer user does, as a script, through MONAI Label's own client.

    python monailabel_app/scripts/client_demo.py --server http://127.0.0.1:8000 [--rounds 1] [--volume]

Each round: ask for the next image (`uncertainty` strategy) -> segment it with its report text ->
save the label (here the model's own mask stands in for the user's correction), timed. The label is
saved under the tag `client_demo`, never as `final` unless `--tag final` says so: pointed at a real
server, the model's unreviewed masks must not become the user's ground truth.
`--volume` then uploads a synthetic 64x256x256 CT-like NIfTI volume with a report, segments it and
checks that the label has the volume's size, spacing, origin and direction. Prints one JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _volume(path: Path, shape=(64, 256, 256)) -> None:
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    vol = np.where(body, 40.0, -1000.0)
    for cx in (0.33, 0.67):  # two lungs
        lung = ((y - shape[1] * 0.45) / (shape[1] * 0.3)) ** 2 + ((x - shape[2] * cx) / (shape[2] * 0.13)) ** 2 < 1
        vol[lung] = -850.0
    lesion = ((z - 32) / 10) ** 2 + ((y - shape[1] * 0.35) / 14) ** 2 + ((x - shape[2] * 0.67) / 14) ** 2 < 1
    vol[lesion] = -150.0
    vol += rng.normal(0, 20, vol.shape)
    image = sitk.GetImageFromArray(vol.astype(np.int16))
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetOrigin((-90.0, -120.0, 30.0))
    sitk.WriteImage(image, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="the MONAI Label server's URL")
    parser.add_argument("--model", default="fasttextdiff", help="infer model name")
    parser.add_argument("--strategy", default="uncertainty", help="active-learning strategy for the next image")
    parser.add_argument("--rounds", type=int, default=1, help="images to fetch, segment and label")
    parser.add_argument("--tag", default="client_demo",
                        help="label tag to save the masks under (default client_demo; 'final' makes them ground "
                             "truth)")
    parser.add_argument("--volume", action="store_true", help="also upload and segment a 64x256x256 NIfTI volume")
    parser.add_argument("--wait", type=float, default=900, help="seconds to wait for the model to be ready")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fasttextdiff-client-") as work:  # the client's result files, removed
        return _run(args, Path(work))


def _run(args, work: Path) -> int:
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(args.server, tmpdir=str(work))
    deadline = time.time() + args.wait
    while True:  # the server may still be building its default model
        state = client.info().get("fasttextdiff", {}).get("model", {})
        if state.get("state") == "ready":
            break
        if state.get("state") in ("failed", "waiting") or time.time() > deadline:
            print(json.dumps({"error": f"model not ready: {state}"}))
            return 1
        time.sleep(5)

    summary: dict = {"server": args.server, "rounds": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        sample = client.next_sample(args.strategy, {})
        if not sample.get("id"):
            summary["rounds"].append({"note": "no unlabeled image left"})
            break
        t1 = time.perf_counter()
        label_file, result = client.infer(args.model, sample["id"], {"text": sample.get("text", "")})
        t2 = time.perf_counter()
        client.save_label(sample["id"], label_file, tag=args.tag, params={"source": "client_demo"})
        t3 = time.perf_counter()
        summary["rounds"].append({
            "image": sample["id"], "uncertainty": sample.get("uncertainty"), "text_source": result.get("text_source"),
            "foreground_fraction": result.get("foreground_fraction"),
            "uncertainty_mean": result.get("uncertainty", {}).get("mean"),
            "seconds": {"next_sample": round(t1 - t0, 3), "infer": round(t2 - t1, 3), "save_label": round(t3 - t2, 3),
                        "total": round(t3 - t0, 3)}})

    if args.volume:
        import SimpleITK as sitk

        vol_path = work / "client_volume.nii.gz"
        _volume(vol_path)
        image_id = f"client_volume_{int(time.time())}"
        t0 = time.perf_counter()
        client.upload_image(str(vol_path), image_id,
                            {"text": "Unilateral pulmonary infection, one infected area, upper left lung."})
        t1 = time.perf_counter()
        label_file, result = client.infer(args.model, image_id, {})
        t2 = time.perf_counter()
        ref, label = sitk.ReadImage(str(vol_path)), sitk.ReadImage(label_file)
        same = (label.GetSize() == ref.GetSize()
                and all(abs(a - b) < 1e-4 for a, b in zip(label.GetSpacing(), ref.GetSpacing()))
                and all(abs(a - b) < 1e-3 for a, b in zip(label.GetOrigin(), ref.GetOrigin()))
                and all(abs(a - b) < 1e-6 for a, b in zip(label.GetDirection(), ref.GetDirection())))
        summary["volume"] = {"image": image_id, "size": list(label.GetSize()), "same_geometry": same,
                             "pixel_type": label.GetPixelIDTypeAsString(), "text_source": result.get("text_source"),
                             "seconds": {"upload": round(t1 - t0, 3), "infer": round(t2 - t1, 3)}}
    print(json.dumps(summary, indent=2))
    ok = all("seconds" in r for r in summary["rounds"]) and summary.get("volume", {}).get("same_geometry", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
