"""Hostile input against the real server: every finding of the outside fuzz as its own
test, then a bounded, seeded fuzz over every route the app registers, then the invariants.

One real server (in-process uvicorn on 127.0.0.1, MONAI Label's routes as the app re-registers
them, a tiny default model) serves the whole module. Around it:

* `outside/` is a sentinel tree beside the studies and the app's state folder: a "secret" raw
  image (named by crafted NRRD/MHD headers), files, a folder. Its snapshot (size, mtime and ctime
  of every entry) must not change, and inotify must see no open of any file in it;
* the server's temporary folder (`tempfile.tempdir` and `TMPDIR`) is a fresh folder that must hold
  nothing new afterwards: every upload, refused or not, is cleaned up;
* the datastore must stay consistent (every listed image and label exists; a final label has its
  image's shape), a normal infer answers identically before and after, and no answer is a 5xx,
  echoes the secret, or names a server temp path.

With FASTTEXTDIFF_WRITE_FIGURES=1 the fuzz's figures are written into docs/RELIABILITY.md (between the
fuzz-figures markers); a plain `make test` leaves the checkout as it was.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reliability_cases as cases
from server_fixtures import REPO, OpenWatch, make_tiny_studies, ready_inprocess_server

pytestmark = [pytest.mark.server, pytest.mark.skipif(not os.sys.platform.startswith("linux"),
                                                     reason="inotify is Linux-only")]

SECRET = (b"FTDSECRET7q-" * 22)[:cases.SECRET_SIDE ** 2]  # a valid 16x16 uint8 raw image, recognisable anywhere
MARKER = b"FTDSECRET7q"
REFERENCE_IMAGE = "cxr_000"  # never changed by any test here: the before/after infer compares on it
READ_ONLY_IDS = ["cxr_000", "cxr_001", "ct_000"]
OWNED_IDS = ["fz_a", "fz_b", "fz_c"]  # the fuzz may create, replace and delete these
HEAVY_ROUTES = {("POST", "/train/"), ("POST", "/train/{model}"), ("POST", "/batch/infer/{model}"),
                ("POST", "/scoring/"), ("POST", "/scoring/{method}")}
DOC = REPO / "docs" / "RELIABILITY.md"
FIG_BEGIN, FIG_END = "<!-- fuzz-figures:begin -->", "<!-- fuzz-figures:end -->"


# ============================================================================== the world
@dataclass
class World:
    root: Path
    studies: Path
    state: Path
    tmp: Path
    outside: Path
    server: object
    watch: OpenWatch
    session: object
    before: dict = field(default_factory=dict)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    current: str = ""  # the route being fuzzed
    by_route: collections.Counter = field(default_factory=collections.Counter)
    fuzz: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    sessions: set = field(default_factory=set)  # every session id the server handed out here

    @property
    def url(self) -> str:
        return self.server.url

    def send(self, method: str, path: str, **kw):
        """One request; every answer is checked: no 5xx, no secret, no server temp path."""
        kw.setdefault("timeout", 120)
        r = self.session.request(method, self.url + path, **kw)
        self.statuses[r.status_code] += 1
        self.by_route[(self.current, r.status_code)] += 1
        body = r.content
        where = f"{method} {path[:160]}"
        if r.status_code >= 500:
            self.problems.append(f"{where}: {r.status_code} {body[:300]!r}")
        if method == "PUT" and path.startswith("/session/") and r.status_code == 200:
            self.sessions.add(r.json()["session_id"])
        if MARKER in body:
            self.problems.append(f"{where}: the answer contains the secret")
        if (str(self.tmp).encode() in body or b"fasttextdiff-upload-" in body) and not path.startswith("/logs/"):
            # (the server log, for admins, names server paths by design)
            self.problems.append(f"{where}: the answer names a server temp path: {body[:300]!r}")
        return r

    def client(self):
        from monailabel.client import MONAILabelClient

        folder = self.root / "client" / str(time.monotonic_ns())
        folder.mkdir(parents=True)
        return MONAILabelClient(self.url, tmpdir=str(folder))


def _tree(folder: Path, skip: tuple[str, ...] = ()) -> dict:
    """Every entry under `folder` with what a write, a rename or a chmod would change (ctime included:
    a file unpacked with a 1970 mtime still gets a new ctime)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts and rel.parts[0] in skip:
            continue
        st_ = path.lstat()
        out[str(rel)] = (path.is_dir(), st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns)
    return out


def _entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


# `monailabel start_server` creates the empty folders model/, logs/ and bin/ in the app folder when missing
# and appends every server's log to logs/app.log (servers other test workers run at the same time
# included): those four entries' existence, size and times are not compared. Any other change in the app
# folder, a file in model/ or bin/ or a new file in logs/ included, still counts.
_SHARED_APP_LOG = {"model", "logs", "bin", str(Path("logs") / "app.log")}


def _app_tree() -> dict:
    return {k: v for k, v in _tree(REPO / "monailabel_app").items()
            if "__pycache__" not in k and k not in _SHARED_APP_LOG}


HOME_SESSIONS = Path.home() / ".cache" / "monailabel" / "sessions"  # MONAI Label's default session store


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import requests

    root = tmp_path_factory.mktemp("security")
    tmp, outside = root / "tmp", root / "outside"
    tmp.mkdir()
    (outside / "folder").mkdir(parents=True)
    (outside / "secret.raw").write_bytes(SECRET)
    (outside / "notes.txt").write_text("patient list: not for the server\n")
    (outside / "folder" / "deeper.png").write_bytes(cases.png_bytes(16, 16))
    studies = make_tiny_studies(root / "studies", n_2d=5, n_3d=1, n_labeled=2)
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(tmp), str(tmp)  # the server's and its subprocesses' temp folder
    try:
        with ready_inprocess_server(studies, root / "state") as server:
            server.app.wait_for_background(120)
            w = World(root, studies, root / "state", tmp, outside, server, OpenWatch(outside), requests.Session())
            w.before = {"outside": _tree(root, skip=("studies", "state", "tmp", "client")), "tmp": _entries(tmp),
                        "app": _app_tree(), "infer": _reference_infer(w)}
            with w.watch:
                yield w
            w.session.close()
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]


def _reference_infer(w: World) -> np.ndarray:
    from fasttextdiff.data.io import read_image

    r = w.send("POST", f"/infer/fasttextdiff?image={REFERENCE_IMAGE}&output=image",
               files={"params": (None, json.dumps({"n_noise": 2, "save_uncertainty": False}))})
    assert r.status_code == 200, r.text
    path = w.root / "client" / f"reference-{time.monotonic_ns()}.nrrd"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(r.content)
    return read_image(path).array


def _detail(r) -> str:
    try:
        return str(r.json().get("detail"))
    except (ValueError, AttributeError):
        return r.text


def _datastore(w: World) -> dict:
    r = w.send("GET", "/datastore/?output=all")
    assert r.status_code == 200
    return r.json()["objects"]


def _assert_consistent(w: World) -> int:
    """Every listed image and label exists; every final label has its image's shape. Returns the count."""
    from fasttextdiff.data.io import read_image

    objects = _datastore(w)
    for image_id, obj in objects.items():
        image_path = w.studies / f"{image_id}{obj['image']['ext']}"
        assert image_path.is_file(), f"{image_id} is listed but {image_path.name} is missing"
        image = read_image(image_path)
        for tag, label in obj["labels"].items():
            label_path = w.studies / "labels" / tag / f"{image_id}{label['ext']}"
            assert label_path.is_file(), f"label {tag} of {image_id} is listed but missing"
            if tag == "final":
                expected = image.array.shape[: 3 if image.is_volume else 2]
                assert read_image(label_path).array.shape == expected, f"final label of {image_id} does not fit"
    return len(objects)


def _nothing_new(w: World) -> None:
    assert _tree(w.root, skip=("studies", "state", "tmp", "client")) == w.before["outside"], \
        "a file outside the studies and state folders was created or changed"
    assert _entries(w.tmp) == w.before["tmp"], f"temp files left: {sorted(_entries(w.tmp) - w.before['tmp'])[:10]}"


# ============================================================================== multipart by hand
def multipart(fields=(), files=(), boundary: str = "fz-b0undary") -> tuple[bytes, str]:
    """A multipart body written byte by byte (names and field bytes exactly as given: NUL, '..')."""
    out = b""
    for name, value in fields:
        value = value if isinstance(value, bytes) else str(value).encode("utf-8")
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
    for name, filename, data in files:
        quoted = filename.replace('"', "%22")
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{quoted}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode("utf-8", "surrogateescape") + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def upload(w: World, method: str, path: str, fields=(), files=(), boundary: str = "fz-b0undary"):
    body, ctype = multipart(fields, files, boundary)
    return w.send(method, path, data=body, headers={"content-type": ctype})


def _png(side: int, seed: int = 0) -> bytes:
    return cases.png_bytes(side, side, seed=seed)


def _label_png(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    mask = np.zeros((side, side), np.uint8)
    mask[2:6, 2:6] = 1
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


# ============================================================================== finding 1: archives
def test_session_archives_that_escape_their_folder_are_refused(world):
    for case, name, data in cases.escaping_archives(str(world.outside)):
        r = upload(world, "PUT", "/session/?uncompress=true", files=[("files", name, data)])
        assert r.status_code == 400, f"{case}: {r.status_code} {r.text}"
        assert "nothing was unpacked" in _detail(r) or "cannot unpack" in _detail(r), (case, _detail(r))
        if name.endswith(".zip") or ".tar" in name:
            r = upload(world, "PUT", "/datastore/image?image=fz_series", files=[("file", name, data)])
            assert r.status_code == 400, f"{case} as a DICOM series upload: {r.status_code} {r.text}"
    _nothing_new(world)
    assert not (world.studies / "fz_series.nii.gz").exists()


def test_a_safe_archive_becomes_a_session_in_the_state_folder(world):
    data = cases.zip_bytes([("case/a.png", _png(32, 1), "file"), ("case/b.png", _png(32, 2), "file")])
    r = upload(world, "PUT", "/session/?uncompress=true", files=[("files", "case.zip", data)])
    assert r.status_code == 200, r.text
    session = r.json()["session_id"]
    stored = Path(r.json()["session_info"]["image"])
    assert world.state in stored.parents and sorted(p.name for p in stored.rglob("*.png")) == ["a.png", "b.png"]
    r = world.send("GET", f"/session/{session}?image=true")
    assert r.status_code == 400 and "folder of 2 files" in _detail(r)
    assert world.send("GET", f"/session/{session}").status_code == 200
    assert world.send("DELETE", f"/session/{session}").status_code == 200
    assert world.send("GET", f"/session/{session}").status_code == 404
    assert not stored.exists()


def test_session_file_names_and_non_archives_get_400(world):
    for name in (".", "..", "a\x00b.png", "dir/..", "dir/"):
        r = upload(world, "PUT", "/session/", files=[("files", name, b"x")])
        assert r.status_code == 400, f"{name!r}: {r.status_code} {r.text}"
    r = upload(world, "PUT", "/session/?uncompress=true", files=[("files", "x.png", _png(32))])
    assert r.status_code == 400 and "not a .zip or .tar archive" in _detail(r)
    r = upload(world, "PUT", "/session/", files=[("files", "same.png", b"1"), ("files", "same.png", b"2")])
    assert r.status_code == 400 and "two uploaded files" in _detail(r)
    r = upload(world, "PUT", "/session/", files=[("files", "/home/me/scan.png", _png(32, 3))])
    assert r.status_code == 200, r.text  # MONAI Label's client sends its whole local path: the name is kept
    session = r.json()["session_id"]
    assert Path(r.json()["session_info"]["image"]).name == "scan.png"
    r = world.send("POST", f"/infer/fasttextdiff?session_id={session}&output=json",
                   files={"params": (None, json.dumps({"n_noise": 1}))})
    assert r.status_code == 200 and r.json()["shape"] == [32, 32], r.text
    for bad in ("%2E%2E", "not-a-session", "0" * 36, quote("../../etc", safe="")):  # requests would resolve ".."
        assert world.send("GET", f"/session/{bad}").status_code in (404, 405), bad
        assert world.send("DELETE", f"/session/{bad}").status_code in (404, 405), bad
    world.send("DELETE", f"/session/{session}")


def test_a_dicom_series_zip_is_stored_as_one_volume(world, tmp_path):
    import SimpleITK as sitk

    from fasttextdiff.data.io import read_image

    folder = tmp_path / "series"
    folder.mkdir()
    volume = sitk.GetImageFromArray((np.arange(4 * 32 * 32) % 97).astype(np.int16).reshape(4, 32, 32))
    volume.SetSpacing((0.7, 0.8, 2.5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(4):
        plane = volume[:, :, z]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0028|0030", "0.8\\0.7"), ("0020|0013", str(z + 1)),
                           ("0020|0032", f"0\\0\\{2.5 * z:.1f}"),
                           ("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{z + 1}")):
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(plane)
    data = cases.zip_bytes([(f"series/{p.name}", p.read_bytes(), "file") for p in sorted(folder.iterdir())])
    r = upload(world, "PUT", "/datastore/image", files=[("file", "fz_series_ok.zip", data)])
    assert r.status_code == 200 and r.json()["image"] == "fz_series_ok", r.text
    stored = read_image(world.studies / "fz_series_ok.nii.gz")
    assert stored.array.shape == (4, 32, 32) and abs(stored.spacing[2] - 2.5) < 1e-3
    r = upload(world, "PUT", "/datastore/image?image=fz_series_bad", files=[("file", "notes.zip",
                                                                              cases.zip_bytes([("a.txt", b"x",
                                                                                                "file")]))])
    assert r.status_code == 415 and "notes.zip" in _detail(r) and "fasttextdiff-upload" not in r.text, r.text
    assert world.send("DELETE", "/datastore/image?id=fz_series_ok").status_code == 200


# ============================================================================== finding 2: file read
def test_images_that_name_another_file_are_refused_without_reading_it(world):
    missing = str(world.outside / "absent.raw")
    for case in cases.REFERENCE_CASES:
        data, data_missing = case.build(str(world.outside / "secret.raw")), case.build(missing)
        answers = []
        for payload in (data, data_missing):
            r1 = upload(world, "PUT", "/datastore/image?image=fz_ref", files=[("file", case.filename, payload)])
            r2 = upload(world, "POST", "/infer/fasttextdiff?output=json", files=[("file", case.filename, payload)])
            r3 = upload(world, "PUT", f"/datastore/label?image={REFERENCE_IMAGE}&tag=fzref",
                        files=[("label", case.filename, payload)])
            answers.append([(r.status_code, _detail(r)) for r in (r1, r2, r3)])
        for status, detail in answers[0]:
            assert status in (400, 415), f"{case.name}: {status} {detail}"
            assert "self-contained" in detail or "unsupported image file type" in detail, (case.name, detail)
            assert case.filename in detail, f"{case.name}: the reason should name the user's file: {detail}"
        assert answers[0] == answers[1], f"{case.name}: the answer depends on whether the named file exists"
    assert world.watch.opened == [], f"a file outside was opened: {world.watch.opened}"
    assert "fz_ref" not in _datastore(world)


# ============================================================================== finding 3: ids and tags
def test_ids_and_tags_with_a_trailing_newline_are_refused(world):
    png = _png(32)
    for query in ("image=cxr_000%0A", "image=fz_a%0A", "image=fz_a%0D%0A", "image=fz%00a"):
        r = upload(world, "PUT", f"/datastore/image?{query}", files=[("file", "x.png", png)])
        assert r.status_code == 400 and "invalid image id" in _detail(r), (query, r.text)
    for tag in ("final%0A", "final%0D", "final%09", "%0Afinal"):
        r = upload(world, "PUT", f"/datastore/label?image={REFERENCE_IMAGE}&tag={tag}",
                   files=[("label", "l.png", _label_png(32))])
        assert r.status_code == 400 and "invalid label tag" in _detail(r), (tag, r.text)
    names = [p.name for p in world.studies.rglob("*")]
    assert not [n for n in names if any(c in n for c in "\n\r\t\0")], names


# ============================================================================== finding 4: re-upload
def test_reupload_is_refused_unless_replace_and_replacement_leaves_a_consistent_datastore(world):
    report = "Left lower lobe opacity."
    r = upload(world, "PUT", "/datastore/image?image=fz_re", fields=[("params", json.dumps({"text": report}))],
               files=[("file", "first.png", _png(64, 4))])
    assert r.status_code == 200, r.text
    for tag in ("final", "second"):
        r = upload(world, "PUT", f"/datastore/label?image=fz_re&tag={tag}", files=[("label", "l.png", _label_png(64))])
        assert r.status_code == 200, r.text
    r = upload(world, "PUT", "/datastore/image?image=fz_re", files=[("file", "again.png", _png(64, 5))])
    assert r.status_code == 409 and '"replace": true' in _detail(r), r.text
    r = upload(world, "PUT", "/datastore/image", files=[("file", "fz_re.png", _png(64, 5))])  # id from the name
    assert r.status_code == 409, r.text

    # replace with another size and another extension: the old image file goes, the report stays,
    # the labels that no longer fit leave the studies folder before the watcher can re-attach them
    volume = cases.nifti_bytes(np.zeros((32, 32, 4), np.int16))
    r = upload(world, "PUT", "/datastore/image?image=fz_re", fields=[("params", json.dumps({"replace": True}))],
               files=[("file", "new.nii.gz", volume)])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["replaced"] is True and body["labels_kept"] == []
    assert sorted(m["tag"] for m in body["labels_moved_aside"]) == ["final", "second"]
    for moved in body["labels_moved_aside"]:
        assert world.state in Path(moved["to"]).parents and Path(moved["to"]).is_file()
    time.sleep(1.0)  # longer than MONAI Label's auto-reload watcher needs (~40 ms)
    obj = _datastore(world)["fz_re"]
    assert obj["image"]["ext"] == ".nii.gz" and obj["image"]["info"]["text"] == report and obj["labels"] == {}
    assert not (world.studies / "fz_re.png").exists()
    assert not list((world.studies / "labels").rglob("fz_re.*"))

    # replace with the same shape: a fitting label stays attached; a new report replaces the old one
    r = upload(world, "PUT", "/datastore/label?image=fz_re&tag=final", files=[("label", "l.nii.gz", volume)])
    assert r.status_code == 200, r.text
    r = upload(world, "PUT", "/datastore/image?image=fz_re",
               fields=[("params", json.dumps({"replace": True, "text": "Clear lungs."}))],
               files=[("file", "same.nii.gz", volume)])
    assert r.status_code == 200 and r.json()["labels_kept"] == ["final"], r.text
    time.sleep(0.5)
    obj = _datastore(world)["fz_re"]
    assert obj["image"]["info"]["text"] == "Clear lungs." and list(obj["labels"]) == ["final"]
    r = upload(world, "PUT", "/datastore/image?image=fz_re", fields=[("params", json.dumps({"replace": "yes"}))],
               files=[("file", "same.nii.gz", volume)])
    assert r.status_code == 400 and "replace" in _detail(r)
    assert world.send("DELETE", "/datastore/image?id=fz_re").status_code == 200
    assert "fz_re" not in _datastore(world)  # removed from the record at once, not when the watcher notices
    assert not list(world.studies.rglob("fz_re*"))
    _assert_consistent(world)


# ============================================================================== finding 5: temp files, messages
def test_refused_uploads_leave_no_temp_file_and_name_the_users_file(world):
    before = _entries(world.tmp)
    cases_ = [
        ("PUT", "/datastore/image?image=fz_bad", "file", "my scan.png", b"not an image"),
        ("PUT", "/datastore/image?image=fz_bad", "file", "tool.exe", b"MZ"),
        ("POST", "/infer/fasttextdiff", "file", "my scan.png", b"not an image"),
        ("PUT", f"/datastore/label?image={REFERENCE_IMAGE}", "label", "my label.png", _label_png(16)),
        ("PUT", "/model/fasttextdiff", "file", "weights.pt", b"\x80\x04pickle"),
        ("POST", "/infer/wsi_v2/fasttextdiff", "file", "slide.svs", b"x"),
    ]
    for method, path, name, filename, data in cases_:
        r = upload(world, method, path, files=[(name, filename, data)])
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        if name in ("file", "label") and "model" not in path and "wsi" not in path:
            assert filename in _detail(r), f"{path}: the reason should name {filename!r}: {_detail(r)}"
        assert _entries(world.tmp) == before, f"{method} {path} left {sorted(_entries(world.tmp) - before)}"


# ============================================================================== finding 6: parsing
JSON_ROUTES = ["/activelearning/random", "/train/fasttextdiff?run_sync=true", "/train/", "/scoring/",
               "/scoring/fasttextdiff_uncertainty?run_sync=true", "/batch/infer/fasttextdiff?run_sync=true"]


def test_request_parsing_errors_are_4xx_with_a_reason(world):
    deep = "[" * 100_000 + "]" * 100_000
    for field_value in (deep, '{"a": ' * 40 + "1" + "}" * 40, '{"n_noise": Infinity}', '{"n_noise": 1e999}',
                        '{"n_noise": NaN}', "1e400", '"text"'):
        r = upload(world, "PUT", f"/datastore/image/info?image={REFERENCE_IMAGE}", fields=[("info", field_value)])
        assert r.status_code == 400, (field_value[:30], r.status_code, r.text)
        r = upload(world, "POST", f"/infer/fasttextdiff?image={REFERENCE_IMAGE}", fields=[("params", field_value)])
        assert r.status_code == 400, (field_value[:30], r.status_code, r.text)
    for route in JSON_ROUTES:
        for body in ("NaN", "Infinity", "-Infinity", "1e400", deep, "[]", '"x"', '{"a": NaN}', '{"a": 1e999}'):
            r = world.send("POST", route, data=body, headers={"content-type": "application/json"})
            assert r.status_code in (400, 404, 422), (route, body[:20], r.status_code, r.text)
            assert isinstance(r.json()["detail"], (str, list))
    for body in ({"strategy": []}, {"strategy": "first"}, {"strategy": {"x": 1}}):
        r = world.send("POST", "/activelearning/random", json=body)
        assert r.status_code == 400 and "path" in _detail(r), (body, r.text)
    for route, key in (("/train/fasttextdiff?run_sync=true", "model"), ("/scoring/fasttextdiff_uncertainty", "method"),
                       ("/batch/infer/fasttextdiff", "model")):
        r = world.send("POST", route, json={key: []})
        assert r.status_code == 400, (route, r.text)
    r = upload(world, "PUT", "/datastore/image?image=fz_nul", files=[("file", "a\x00b.png", _png(32))])
    assert r.status_code == 400 and "control characters" in _detail(r)
    r = upload(world, "PUT", "/datastore/image?image=fz_b", files=[("file", "a.png", _png(32))], boundary="b" * 300)
    assert r.status_code == 400 and "boundary" in _detail(r).lower(), r.text
    r = world.send("GET", "/logs/gpu")
    assert r.status_code in (200, 404), r.text
    if r.status_code == 404:
        assert "nvidia-smi is not installed" in _detail(r)
    r = upload(world, "PUT", "/model/fasttextdiff", files=[("file", "m.pt", b"\x80\x04")])
    assert r.status_code == 405 and "train" in _detail(r)
    assert world.send("POST", "/reload").status_code == 403
    assert world.send("GET", "/logs/?lines=100000000000000000000").status_code == 400
    assert world.send("HEAD", f"/datastore/image?image={REFERENCE_IMAGE}&check_sum=FOO:abc").status_code == 400
    assert world.send("GET", "/ohif/%2e%2e").status_code in (200, 404)
    assert world.send("GET", "/proxy/dicom/qido/studies").status_code == 404
    assert not world.problems, world.problems


def test_params_cannot_point_infer_at_a_server_file(world):
    r = upload(world, "POST", "/infer/fasttextdiff?output=json",
               fields=[("params", json.dumps({"image": "/etc/hosts"}))],
               files=[("file", "x.png", _png(32))])
    assert r.status_code == 400 and "may not set" in _detail(r)
    r = upload(world, "POST", f"/infer/fasttextdiff?image={REFERENCE_IMAGE}",
               fields=[("params", json.dumps({"save_label": True, "label_tag": "final"}))])
    assert r.status_code == 400  # an infer (user role) never writes labels (annotator role)
    # an id that also names a file in the server's working folder reads the datastore's image
    assert (Path.cwd() / "Makefile").exists()
    r = upload(world, "PUT", "/datastore/image?image=Makefile", files=[("file", "m.png", _png(40, 6))])
    assert r.status_code == 200, r.text
    r = world.send("POST", "/infer/fasttextdiff?image=Makefile&output=json",
                   files={"params": (None, json.dumps({"n_noise": 1}))})
    assert r.status_code == 200 and r.json()["shape"] == [40, 40], r.text
    assert world.send("DELETE", "/datastore/image?id=Makefile").status_code == 200


def test_a_busy_task_is_answered_with_a_sentence(world):
    r = world.send("POST", "/scoring/fasttextdiff_uncertainty", json={})
    assert r.status_code == 200, r.text
    try:
        again = world.send("POST", "/scoring/fasttextdiff_uncertainty", json={})
        assert again.status_code == 409, again.text
        assert "already running" in _detail(again) and "DELETE /scoring/" in _detail(again)
        assert "++++" not in again.text
    finally:
        world.send("DELETE", "/scoring/")
        end = time.time() + 60
        while time.time() < end and world.send("GET", "/scoring/?check_if_running=true").status_code == 200:
            time.sleep(0.5)


# ============================================================================== finding 7: stalls
STALL_MIN_S = 5.0  # a job shorter than this is made longer (more images) and run again
STALL_TARGET_S = 8.0  # what the next size aims at
STALL_MAX_IMAGES = 400
STALL_PREFIX = "stall_"


def _add_stall_images(world: World, n: int) -> list[str]:
    """`n` unlabeled 2D images with reports of this test's own (more images: a longer job)."""
    have = {k for k in _datastore(world) if k.startswith(STALL_PREFIX)}
    ids = [f"{STALL_PREFIX}{i:03d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        if image_id not in have:
            r = upload(world, "PUT", f"/datastore/image?image={image_id}",
                       fields=[("params", json.dumps({"text": f"Opacity in the left lower lung, case {i}."}))],
                       files=[("file", f"{image_id}.png", _png(32, 100 + i))])
            assert r.status_code == 200, r.text
    return ids


def _run_while_probing_info(world: World, method: str, route: str, body: dict) -> tuple[float, list[float]]:
    """Run one run_sync request in a thread; meanwhile GET /info/ again and again. (seconds, latencies)"""
    result: dict = {}

    def job():
        t0 = time.time()
        result["response"] = world.send(method, route, json=body, timeout=600)
        result["seconds"] = time.time() - t0

    thread = threading.Thread(target=job)
    thread.start()
    latencies = []
    while thread.is_alive():
        t0 = time.time()
        r = world.send("GET", "/info/", timeout=600)
        latencies.append(time.time() - t0)
        assert r.status_code == 200
        time.sleep(0.05)
    thread.join()
    assert result["response"].status_code == 200, result["response"].text
    return result["seconds"], latencies


def test_run_sync_work_leaves_info_answering_within_a_second(world):
    """/info/ answers while run_sync scoring and batch infer run. The job's length is the test's own: a job
    shorter than STALL_MIN_S on this machine is run again on more images (sized from the measured time per
    image), so the check never depends on the CPU's speed. A stalled /info/ would wait for most of the job;
    it must answer in under half of it (a 2x margin either way: >= 2.5 s of slack on a loaded machine)."""
    from fasttextdiff.data.io import read_image  # noqa: F401 - warm import outside the timing

    jobs = [("POST", "/scoring/fasttextdiff_uncertainty?run_sync=true", {"n_noise": 32}),
            ("POST", "/batch/infer/fasttextdiff?images=unlabeled&run_sync=true",
             {"device": "cpu", "label_tag": "original", "max_workers": 1, "n_noise": 32})]
    n_images = 4
    try:
        for method, route, body in jobs:
            for attempt in range(6):
                ids = _add_stall_images(world, n_images)
                unlabeled = [k for k, v in _datastore(world).items() if "final" not in v["labels"]]
                for n, image_id in enumerate(unlabeled):  # a new report makes every score stale: real work to do
                    r = world.send("PUT", f"/datastore/image/info?image={quote(image_id)}",
                                   files={"info": (None,
                                                   json.dumps({"text": f"Opacity {attempt} {n} {time.time()}."}))})
                    assert r.status_code == 200, r.text
                seconds, latencies = _run_while_probing_info(world, method, route, body)
                if seconds >= STALL_MIN_S:
                    break
                assert n_images < STALL_MAX_IMAGES, f"{route} on {len(unlabeled)} images took only {seconds:.2f} s"
                per_image = seconds / max(len(unlabeled), 1)
                n_images = min(STALL_MAX_IMAGES, max(2 * n_images, n_images + int(STALL_TARGET_S / per_image)))
            else:
                pytest.fail(f"{route} never lasted {STALL_MIN_S} s (last {seconds:.2f} s on {len(ids)} images)")
            print(f"\n{route.split('?')[0]}: {seconds:.1f} s on {len(unlabeled)} unlabeled images (attempt "
                  f"{attempt + 1}); "
                  f"/info/ answered {len(latencies)} times, at most in {max(latencies):.3f} s")
            # a stalled /info/ waits about as long as the job: it must answer in under half of it, and often
            assert len(latencies) >= 3 and max(latencies) < seconds / 2, (route, round(seconds, 2), latencies)
            world.fuzz.setdefault("info_during_run_sync", []).append(
                (route.split("?")[0], round(seconds, 1), round(max(latencies), 3), len(latencies)))
    finally:
        for image_id in [k for k in _datastore(world) if k.startswith(STALL_PREFIX)]:
            world.send("DELETE", f"/datastore/image?id={image_id}")


def test_scoring_says_what_it_did(world):
    """Incremental scoring, set up here: a new image is scored, a second run scores nothing and says why, a new
    report makes that image's score stale and only it is scored again."""
    world.server.app.wait_for_background(120)
    r = upload(world, "PUT", "/datastore/image?image=sc_new",
               fields=[("params", json.dumps({"text": "Opacity in the right upper lung."}))],
               files=[("file", "sc_new.png", _png(32, 77))])
    assert r.status_code == 200, r.text
    try:
        first = world.send("POST", "/scoring/fasttextdiff_uncertainty?run_sync=true", json={})
        assert first.status_code == 200, first.text
        assert "sc_new" in first.json()["scores"] and "scored" in first.json()["detail"], first.json()
        again = world.send("POST", "/scoring/fasttextdiff_uncertainty?run_sync=true", json={})
        assert again.status_code == 200, again.text
        res = again.json()
        assert res["scores"] == {} and "already had a current score" in res["detail"], res
        r = world.send("PUT", "/datastore/image/info?image=sc_new",
                       files={"info": (None, json.dumps({"text": "Clear lungs."}))})
        assert r.status_code == 200, r.text
        stale = world.send("POST", "/scoring/fasttextdiff_uncertainty?run_sync=true", json={})
        assert stale.status_code == 200, stale.text
        assert set(stale.json()["scores"]) == {"sc_new"}, stale.json()
    finally:
        world.send("DELETE", "/datastore/image?id=sc_new")


# ============================================================================== the fuzz
HOSTILE = ["", " ", ".", "..", "../x", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "x\n", "final\n", "x\r\n",
           "x\x00y", "%2e%2e%2f", "x" * 300, "\U0001fae1", "CON", "-", "a..b", ".hidden", "null", "[]", "{}", "NaN",
           "1e999", "-1", "0", "99999999999999999999999", "true", "\u202e", "fz_a\n"]
NUMBERS = ["-1", "0", "1", "2", "99999999999999999999999", "1e999", "nan", "inf", "-inf", "true", "x", ""]
JSON_TEXTS = ["{}", "{", "[]", "1e999", "NaN", "Infinity", '{"n_noise": Infinity}', '{"n_noise": 1e999}',
              "[" * 3000 + "]" * 3000, '{"a":' * 40 + "1" + "}" * 40, '{"text": "\\u0000"}', '{"text": 5}',
              '{"replace": true}', '{"replace": "yes"}', '{"image": "/etc/passwd"}', '{"session": {}}',
              '{"save_label": true, "label_tag": "final"}', '{"result": "uncertainty", "n_noise": 1}',
              '{"n_noise": 1, "save_uncertainty": false}', '{"name": "x.png"}', '{"ts": 1}',
              '{"text": "' + "y" * 70000 + '"}', '{"fasttextdiff_uncertainty": 1}', '{"client_id": []}',
              '{"level": -1, "size": [99999999, 1]}', '{"model": []}', '{"method": 7}', '{"strategy": []}',
              '{"images": "all"}']
PLAUSIBLE_FIELDS = ["{}", '{"text": "Left lower lobe opacity."}', '{"replace": true}', '{"n_noise": 1}',
                    '{"replace": true, "text": "Clear."}', '{"source": "fuzz"}']
# bodies every route refuses (the heavy routes get only these: a valid one would start real work)
INVALID_BODIES = ["NaN", "1e400", "[]", '"x"', "[" * 3000 + "]" * 3000, '{"a": NaN}', '{"x": [1e999]}',
                  '{"a":' * 40 + "1" + "}" * 40, "{", "-Infinity"]


def _file_pool(world: World) -> tuple[list, list]:
    """(good files, hostile files) to upload."""
    secret = str(world.outside / "secret.raw")
    good = [("ok.png", _png(32, 7)), ("small.png", _png(16, 8)), ("label.png", _label_png(32)),
            ("label16.png", _label_png(16)), ("vol.nii.gz", cases.nifti_bytes(np.zeros((16, 16, 4), np.int16))),
            ("good.zip", cases.zip_bytes([("a.png", _png(32, 9), "file")]))]
    pool = [("empty.png", b""), ("corrupt.png", b"\x89PNG\r\n\x1a\nxx"), ("notes.txt", b"report"),
            ("w.pt", b"\x80\x04K\x01.")]
    pool += [(c.filename, c.build(secret)) for c in cases.REFERENCE_CASES]
    pool += [(name, data) for _, name, data in cases.escaping_archives(str(world.outside))]
    pool += [(c.filename, c.build()) for c in cases.FILE_CASES[:8]]
    return good, pool


FILE_NAMES = [".", "..", "a\x00b.png", "../x.png", "/abs/dir/x.png", "C:\\x\\y.png", "x" * 300 + ".png", "ok.png",
              "scan.nii.gz", "series.zip", "", "fz_a.png", "fz_b.nii.gz", "%2e%2e.png", "\U0001fae1.png", "a\nb.png"]


def _route_names(world: World) -> dict:
    info = world.send("GET", "/info/").json()
    return {"model": list(info["models"]), "trainer": list(info["trainers"]), "strategy": list(info["strategies"]),
            "method": list(info["scoring"])}


def _all_routes(world: World) -> tuple[list[tuple[str, str]], set]:
    import monailabel.app

    schema = world.send("GET", "/openapi.json").json()
    documented = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    registered = {(method, path) for method, path, _ in registered_routes(monailabel.app.app.router)}
    assert documented <= registered, documented - registered
    return sorted(registered), documented


def registered_routes(router):
    """(method, path, route) of every route, also inside included routers (FastAPI keeps them nested)."""
    from starlette.routing import Mount

    for route in router.routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from registered_routes(included)
        elif isinstance(route, Mount):
            yield "GET", route.path + "/{path}", route
        else:
            for method in sorted(getattr(route, "methods", None) or ()):
                yield method, route.path, route


def _kind(annotation) -> list[str]:
    """Plausible values for a query parameter of this type (hostile ones are mixed in separately)."""
    import enum
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = args[0]
    if kind is bool:
        return ["true", "false", "1", "0"]
    if kind is int:
        return ["0", "1", "3", "10", "600"]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return [m.value for m in kind]
    return []


def _spec(route) -> dict:
    """What the route takes, read from its FastAPI signature (the same for routes outside openapi)."""
    from fastapi import params as fp

    dep = getattr(route, "dependant", None)
    if dep is None:
        return {"query": [], "required": set(), "files": [], "forms": [], "json": False}
    files = [f.name for f in dep.body_params if isinstance(f.field_info, fp.File)]
    forms = [f.name for f in dep.body_params if isinstance(f.field_info, fp.Form) and f.name not in files]
    return {"query": [f.name for f in dep.query_params],
            "kinds": {f.name: _kind(f.field_info.annotation) for f in dep.query_params},
            "required": {f.name for f in dep.query_params if f.field_info.is_required()},
            "files": files, "forms": forms, "json": bool(dep.body_params) and not files and not forms}


def _fuzz_one_route(world: World, method: str, path: str, spec: dict, names: dict, pool, sessions: list,
                    budget: int) -> None:
    heavy = (method, path) in HEAVY_ROUTES
    ids = st.sampled_from(HOSTILE + OWNED_IDS + (READ_ONLY_IDS if method in ("GET", "HEAD") else []))
    values = st.sampled_from(HOSTILE + NUMBERS)
    file_names = st.one_of(st.sampled_from(FILE_NAMES), st.text(max_size=12).map(lambda t: t + ".png"))
    likely = st.integers(0, 9).map(lambda n: n < 8)  # mostly send what the route needs, to get past validation

    @settings(max_examples=budget, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        # a third of the requests are plausible (known names, good files and fields) so that the
        # fuzz also reaches the code that changes the datastore; the rest are hostile throughout
        plausible_mode = data.draw(st.integers(0, 2)) == 0
        url = path
        for param in ("model", "strategy", "method", "session_id", "path:path", "path"):
            token = "{" + param + "}"
            if token not in url:
                continue
            key = param.split(":")[0]
            if key == "model" and path.startswith("/train"):
                key = "trainer"
            if key in names and not heavy and data.draw(likely):
                value = data.draw(st.sampled_from(names[key]))
            elif key == "session_id" and sessions and data.draw(st.booleans()):
                value = data.draw(st.sampled_from(sessions))
            else:
                value = data.draw(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=16)))
            url = url.replace(token, quote(value, safe="") or "x")
        query = {}
        for key in spec["query"]:
            if not data.draw(likely if key in spec["required"] else st.booleans()):
                continue
            plausible = spec["kinds"].get(key) or (
                OWNED_IDS + (READ_ONLY_IDS if method in ("GET", "HEAD", "POST") else []) if key in ("image", "id",
                                                                                                    "label")
                else sessions or ["x"] if key == "session_id" else ["final", "original", "fzt"] if key == "tag"
                else ["SHA256:00", "MD5:00"] if key == "check_sum" else ["x"])
            hostile = ids if key in ("image", "id", "label") else values
            query[key] = data.draw(st.sampled_from(plausible) if plausible_mode or data.draw(st.booleans())
                                   else hostile)
        if data.draw(st.integers(0, 9).map(lambda n: n == 9)):
            query["zz"] = data.draw(values)
        if heavy:
            query["run_sync"] = "true"
        if query:
            url += ("&" if "?" in url else "?") + "&".join(f"{quote(k)}={quote(str(v), safe='')}"
                                                           for k, v in query.items())
        shapes = (["multipart"] * 6 if spec["files"] or spec["forms"]
                  else ["json"] * 6 if spec["json"] else ["none"] * 6)
        shape = "json" if heavy else shapes[0] if plausible_mode else \
            data.draw(st.sampled_from(shapes + ["none", "json", "multipart", "odd"]))
        if shape == "none":
            r = world.send(method, url)
        elif shape == "json":
            body = data.draw(st.sampled_from(INVALID_BODIES)) if heavy else data.draw(st.one_of(
                st.sampled_from(JSON_TEXTS + INVALID_BODIES),
                st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                             max_leaves=8).map(lambda v: json.dumps({"params": v} if isinstance(v, list) else v))))
            r = world.send(method, url, data=body.encode("utf-8", "surrogatepass"),
                           headers={"content-type": "application/json"})
        elif shape == "multipart":
            fields = [(k, data.draw(st.sampled_from(PLAUSIBLE_FIELDS if plausible_mode or data.draw(st.booleans())
                                                    else JSON_TEXTS)))
                      for k in spec["forms"] + ([] if plausible_mode else ["zz"]) if data.draw(st.booleans())]
            if data.draw(st.integers(0, 9).map(lambda n: n == 9)):
                fields.append(("params", b'{"text": "caf\xe9"}'))
            files = []
            for name in spec["files"] or ["file"]:
                count = data.draw(st.sampled_from([1, 1, 1, 1, 0, 2])) if name == "files" else int(data.draw(likely))
                for _ in range(max(count, int(plausible_mode))):
                    fname, content = data.draw(st.sampled_from(pool[0] if plausible_mode or data.draw(st.booleans())
                                                               else pool[1]))
                    if not plausible_mode and data.draw(st.integers(0, 3).map(lambda n: n == 3)):
                        fname = data.draw(file_names)
                    files.append((name, fname, content))
            r = upload(world, method, url, fields, files)
        else:  # multipart oddities
            kind = data.draw(st.sampled_from(["long boundary", "no boundary", "truncated", "json as multipart",
                                              "garbage", "no final boundary"]))
            body, ctype = multipart([("params", "{}")], [("file", "ok.png", _png(32))])
            if kind == "long boundary":
                body, ctype = multipart([("params", "{}")], [("file", "ok.png", b"x")], boundary="q" * 300)
            elif kind == "no boundary":
                ctype = "multipart/form-data"
            elif kind == "truncated":
                body = body[: len(body) // 2]
            elif kind == "json as multipart":
                body = b'{"a": 1}'
            elif kind == "garbage":
                body = bytes(range(256)) * 4
            else:
                body = body.rsplit(b"--fz-b0undary--", 1)[0]
            r = world.send(method, url, data=body, headers={"content-type": ctype})
        if heavy:
            assert r.status_code >= 400, f"{method} {url}: a heavy route accepted a fuzz request ({r.status_code})"
        if method == "PUT" and path == "/session/" and r.status_code == 200:
            sessions.append(r.json()["session_id"])

    run()


def test_fuzz_every_route(world):
    started = time.time()
    import monailabel.app

    names = _route_names(world)
    routes, documented = _all_routes(world)
    specs = {(m, p): _spec(route) for m, p, route in registered_routes(monailabel.app.app.router)}
    pool = _file_pool(world)
    sessions: list[str] = []
    before = sum(world.statuses.values())
    statuses_before = collections.Counter(world.statuses)
    per_route = {}
    for method, path in routes:
        n0, t0 = sum(world.statuses.values()), time.time()
        world.current = f"{method} {path}"
        budget = 12 if (method, path) in HEAVY_ROUTES else 30 if method in ("PUT", "POST") else 15
        if path.startswith(("/proxy/", "/infer/wsi", "/reload", "/static", "/docs", "/openapi", "/favicon")) \
                or (method, path) == ("PUT", "/model/{model}"):
            budget = 8  # refused or static by design: a few requests each
        if (method, path) in (("POST", "/infer/{model}"), ("PUT", "/datastore/image"), ("PUT", "/datastore/label"),
                              ("PUT", "/session/"), ("PUT", "/datastore/image/info")):
            budget = 50
        _fuzz_one_route(world, method, path, specs[(method, path)], names, pool, sessions, budget)
        per_route[f"{method} {path}"] = (sum(world.statuses.values()) - n0, round(time.time() - t0, 1))
    world.server.app.wait_for_background(300)
    world.fuzz.update(requests=sum(world.statuses.values()) - before, routes=len(routes), documented=len(documented),
                      seconds=round(time.time() - started, 1), per_route=per_route,
                      statuses=world.statuses - statuses_before)
    print(f"\nfuzz: {world.fuzz['requests']} requests over {len(routes)} routes in {world.fuzz['seconds']} s; "
          f"statuses {dict(sorted(world.statuses.items()))}")
    for route, (n, secs) in sorted(per_route.items(), key=lambda kv: -kv[1][1])[:10]:
        print(f"  {n:4d} requests {secs:6.1f} s  {route}")
    if os.environ.get("FUZZ_VERBOSE"):
        for (route, code), n in sorted(world.by_route.items()):
            print(f"  {route:45s} {code} x {n}")
    assert not world.problems, "\n".join(world.problems[:30])


def test_route_table_lists_every_registered_route(world):
    """docs/RELIABILITY.md's route table names every route the server registers (and its role)."""
    import monailabel.app

    doc = DOC.read_text(encoding="utf-8")
    table = doc.split("## Routes: what each does and who may call it", 1)[1].split("\n## ", 1)[0]
    missing = []
    for method, path, _ in registered_routes(monailabel.app.app.router):
        norm = path.replace("{path:path}", "{path}")
        for op in ("wado", "qido", "stow"):
            norm = norm.replace(f"/dicom/{op}/", "/dicom/{wado,qido,stow}/")
        wanted = f"`{method} /`" if path == "/" else norm
        if method != "HEAD" or path.startswith("/datastore"):
            if wanted not in table:
                missing.append(f"{method} {path}")
    assert not missing, f"routes missing from the docs' route table: {missing}"


# ============================================================================== invariants
def test_hypothesis_keeps_its_files_out_of_the_checkout():
    """tests/conftest.py points hypothesis's storage (its database, the unicode tables `st.text()` caches
    even with `database=None`) at the temp folder: `make test` leaves no `.hypothesis/` in the checkout."""
    from hypothesis.configuration import storage_directory

    home = storage_directory(intent_to_write=False).home_directory.resolve()
    assert REPO.resolve() not in (home, *home.parents), home
    assert Path(os.environ["HYPOTHESIS_STORAGE_DIRECTORY"]).resolve() == home  # subprocesses too


def test_zz_nothing_outside_no_temp_files_datastore_consistent_infer_unchanged(world):
    """The invariants, after whatever ran before in this module (any order; alone too: the session it
    checks is its own)."""
    r = upload(world, "PUT", "/session/", files=[("files", "zz-scan.png", _png(32, 9))])
    assert r.status_code == 200, r.text  # World.send records the session id
    world.server.app.wait_for_background(300)
    time.sleep(0.5)
    assert world.watch.opened == [], f"files outside the studies were opened: {world.watch.opened[:10]}"
    outside = _tree(world.root, skip=("studies", "state", "tmp", "client"))
    changed = sorted(set(outside.items()) ^ set(world.before["outside"].items()))
    assert not changed, f"created or changed outside the studies and state folders: {changed[:10]}"
    left = sorted(_entries(world.tmp) - world.before["tmp"])
    assert not left, f"temp files left: {left[:10]}"
    assert _app_tree() == world.before["app"], "the app's code folder changed"
    assert world.sessions and not [s_ for s_ in world.sessions if (HOME_SESSIONS / s_).exists()], \
        "a session was stored in ~/.cache/monailabel instead of the state folder"
    images = _assert_consistent(world)
    after = _reference_infer(world)
    assert np.array_equal(after, world.before["infer"]), "the same infer answers differently after the fuzz"
    assert not world.problems, "\n".join(world.problems[:30])
    if world.fuzz.get("requests") and os.environ.get("FASTTEXTDIFF_WRITE_FIGURES") == "1":
        _write_figures(world, images, len(changed), len(left))


def _write_figures(world: World, images: int, outside_changes: int, temp_left: int) -> None:
    hist = ", ".join(f"{code} × {n}" for code, n in sorted(world.fuzz["statuses"].items()))
    fives = sum(n for c, n in world.statuses.items() if c >= 500)
    stalls = "; ".join(f"`{route}` ran {secs} s, `/info` answered in ≤ {lat} s ({n} probes)"
                       for route, secs, lat, n in world.fuzz.get("info_during_run_sync", []))
    text = (f"{FIG_BEGIN}\n"
            "Last run of `tests/reliability/test_security.py` "
            "(hypothesis, derandomized: the same requests every run): "
            f"**{world.fuzz['requests']} fuzz requests** over **{world.fuzz['routes']} routes** "
            f"({world.fuzz['documented']} in `/openapi.json`, the rest registered outside it) in "
            f"{world.fuzz['seconds']} s; {sum(world.statuses.values())} requests in the whole module.\n\n"
            f"- status histogram of the fuzz requests: {hist}\n"
            f"- **{fives} × 5xx** (whole module); "
            f"**{outside_changes} files created, changed or read outside** the studies and state folders "
            f"({len(world.watch.opened)} opens of the sentinel files); **{temp_left} temp files left**\n"
            f"- datastore consistent afterwards ({images} images, every final label of its image's shape); "
            "the reference infer answered identically before and after\n"
            f"- while run_sync work ran: {stalls}\n"
            f"{FIG_END}")
    doc = DOC.read_text(encoding="utf-8")
    if FIG_BEGIN in doc and FIG_END in doc:
        head, rest = doc.split(FIG_BEGIN, 1)
        doc = head + text + rest.split(FIG_END, 1)[1]
        DOC.write_text(doc, encoding="utf-8")
