"""The infer result's file format, on the real server (in-process uvicorn, a ready tiny model): MONAI Label's
`result_extension` param is honoured (`.nrrd`, `.nii.gz`, `.nii`, `.mha`, `.png` for 2D), anything else is a 400
with the reason, and without it the result comes in the input's own format. Every saved file is opened with
SimpleITK (which picks its reader by the extension) and has the input's shape. The docs' curl examples that save
an infer result (`curl ... /infer/... -o FILE` in README.md and docs/SERVER.md) are run as written against this
server: each saves a file SimpleITK opens, under the extension the server's own file name has."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from server_fixtures import REPO, TINY_CONF, InProcessServer

pytestmark = pytest.mark.server

MODEL = "fasttextdiff"
VOLUME, PLANE = "vol_ct", "case_001"  # case_001: the 2D image the docs' examples name
DOCS = (REPO / "README.md", REPO / "docs" / "SERVER.md")


def _extension(name: str) -> str:
    name = name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root):  # noqa: F811 - the fixture
    from fasttextdiff.data.io import Image, write_image

    studies = tmp_path_factory.mktemp("formats-studies")
    rng = np.random.default_rng(3)
    volume = rng.integers(-1000, 400, (6, 40, 32)).astype(np.int16)
    write_image(studies / f"{VOLUME}.nrrd", volume,
                Image(volume, (0.8, 0.7, 2.5), (10.0, -5.0, 3.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0), True))
    plane = rng.integers(0, 255, (36, 32)).astype(np.uint8)
    write_image(studies / f"{PLANE}.png", plane, Image(plane, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False))
    (studies / f"{PLANE}.txt").write_text("One infected area, upper left lung.", encoding="utf-8")
    conf = dict(TINY_CONF, model_dir=str(tiny_model_root), prepare_default_model="false", n_noise="1",
                state_dir=str(tmp_path_factory.mktemp("formats-state")))
    srv = InProcessServer(studies, conf).start()
    try:
        yield srv
    finally:
        srv.stop()


def _shape(path) -> tuple:
    import SimpleITK as sitk

    return tuple(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape)


def _infer(server, image_id: str, params: dict, file=None):
    return server.client().infer(MODEL, image_id, dict(params, save_uncertainty=False, n_noise=1), file=file)


@pytest.mark.parametrize("image_id,default,formats", [
    (VOLUME, ".nrrd", (".nrrd", ".nii.gz", ".nii", ".mha")),
    (PLANE, ".png", (".png", ".nrrd", ".nii.gz", ".nii", ".mha")),
])
def test_result_extension_and_the_inputs_own_format(server, image_id, default, formats):
    source = server.studies / f"{image_id}{default}"
    want = _shape(source)
    path, params = _infer(server, image_id, {})
    assert _extension(path) == default and _shape(path) == want, (path, params)
    for ext in formats:
        path, params = _infer(server, image_id, {"result_extension": ext})
        assert _extension(path) == ext and _shape(path) == want, (ext, path)
    path, _ = _infer(server, image_id, {"result_extension": ".nrrd", "result": "uncertainty"})
    assert _extension(path) == ".nrrd" and _shape(path) == want
    if default == ".png":  # a float map keeps its values by default; PNG would round them to 256 grey levels
        path, _ = _infer(server, image_id, {"result": "uncertainty"})
        assert _extension(path) == ".nrrd" and _shape(path) == want


def test_an_uploaded_nrrd_comes_back_as_nrrd(server, tmp_path):
    import shutil

    upload = shutil.copy(server.studies / f"{VOLUME}.nrrd", tmp_path / "scan.nrrd")
    path, _ = _infer(server, "", {}, file=str(upload))
    assert _extension(path) == ".nrrd" and _shape(path) == _shape(upload)


@pytest.mark.parametrize("image_id,ext,words", [
    (PLANE, ".jpg", "must be one of .nrrd, .nii.gz, .nii, .mha, .png"),
    (PLANE, "nrrd", "must be one of"),
    (PLANE, ".NRRD", "must be one of"),
    (PLANE, ["x"], "must be one of"),
    (VOLUME, ".png", ".png is for 2D images"),
])
def test_other_result_extensions_are_refused_with_the_reason(server, image_id, ext, words):
    import requests

    r = requests.post(f"{server.url}/infer/{MODEL}?image={image_id}&output=image",
                      files={"params": (None, json.dumps({"result_extension": ext}))}, timeout=120)
    assert r.status_code == 400 and words in r.text, r.text


# ------------------------------------------------------------------------------------- the docs' examples
def _curl_commands(path: Path) -> list[str]:
    """Every curl command of a Markdown file: inline code spans (README's table) and lines of code blocks
    (with `\\` continuations joined)."""
    text = path.read_text(encoding="utf-8")
    commands = re.findall(r"`(curl [^`]+)`", text)
    joined = re.sub(r"\\\n\s*", " ", text)
    commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]
    return commands


def _infer_examples() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for command in _curl_commands(doc):
            words = shlex.split(command, comments=True)
            if any("/infer/" in w for w in words) and "-o" in words:
                found.append((doc.name, words))
    return found


def _expected_extension(words: list[str], formats: dict[str, str]) -> str:
    """What the server sends for this request: the params' `result_extension`, else the image's own format."""
    url = next(w for w in words if "/infer/" in w)
    image = parse_qs(urlsplit(url.replace("$S", "http://host")).query)["image"][0]
    params: dict = {}
    for flag, value in zip(words, words[1:]):
        if flag == "-F" and value.startswith("params="):
            params = json.loads(value[len("params="):])
        elif flag in ("-d", "--data"):
            params = json.loads(value)
    return params.get("result_extension") or formats[image]


EXAMPLES = _infer_examples()


def test_the_docs_have_infer_examples_that_save_files():
    assert {doc for doc, _ in EXAMPLES} == {"README.md", "SERVER.md"} and len(EXAMPLES) >= 3, EXAMPLES


@pytest.mark.parametrize("doc,words", EXAMPLES, ids=[f"{d}:{i}" for i, (d, _) in enumerate(EXAMPLES)])
def test_docs_infer_examples_save_a_file_named_for_its_format(server, tmp_path, doc, words):
    out = words[words.index("-o") + 1]
    assert _extension(out) == _expected_extension(words, {PLANE: ".png", VOLUME: ".nrrd"}), words
    # run it as written, `$S` the server's URL, keeping the response headers to see the server's file name
    argv = [w.replace("$S", server.url) for w in words] + ["-f", "-D", "headers.txt"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NO_PROXY": "*", "no_proxy": "*"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (words, done.stderr)
    headers = (tmp_path / "headers.txt").read_text(encoding="latin-1")
    sent = re.search(r"filename\*=utf-8''([^\s;]+)", headers, re.IGNORECASE)
    assert sent and _extension(sent.group(1)) == _extension(out), headers
    assert _shape(tmp_path / out) == _shape(server.studies / f"{PLANE}.png")
