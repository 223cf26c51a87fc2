"""Bad requests get HTTP 4xx with a reason and change nothing (datastore, labels, published model).

Real server (in-process uvicorn on 127.0.0.1, tiny default model built on start); requests are
sent raw where MONAI Label's client would refuse to send them, else with the client.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.server

REPORT = "Unilateral pulmonary infection, one infected area, upper left lung."


def _snapshot(server) -> dict:
    """Datastore JSON (images, labels, infos), the files in the studies folder and the model identity."""
    server.app.wait_for_background(120)
    studies = server.studies
    files = sorted(str(p.relative_to(studies)) for p in studies.rglob("*") if p.is_file() and p.name != ".lock")
    return {"datastore": server.client().datastore(), "files": files,
            "model": server.client().info()["fasttextdiff"]["model_identity"]}


@pytest.fixture(scope="module")
def good_png(tmp_path_factory):
    from fasttextdiff.data.io import Image, write_image

    arr = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    like = Image(arr, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)
    return write_image(tmp_path_factory.mktemp("good") / "good.png", arr, like)


def _cases(good_png, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    wrong_label = tmp_path / "wrong_label.png"
    from fasttextdiff.data.io import Image, write_image

    small = np.zeros((8, 8), np.uint8)
    write_image(wrong_label, small, Image(small, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False))
    png = good_png.read_bytes()
    big_text = "x" * (1024 * 1024)
    # (name, method, path, form fields, files, expected status, words in the reason)
    return [
        ("infer unknown image id", "POST", "/infer/fasttextdiff?image=no_such_image", {}, {}, 404,
         "not in the datastore"),
        ("infer path traversal id", "POST", "/infer/fasttextdiff?image=..%2F..%2Fetc%2Fpasswd", {}, {}, 400,
         "invalid image id"),
        ("infer unknown model", "POST", "/infer/no_such_model?image=cxr_000", {}, {}, 404, "unknown model"),
        ("infer malformed params", "POST", "/infer/fasttextdiff?image=cxr_000", {"params": "{oops"}, {}, 400,
         "not valid JSON"),
        ("infer 1 MB text", "POST", "/infer/fasttextdiff?image=cxr_000", {"params": json.dumps({"text": big_text})},
         {}, (400, 413), ("limit", "maximum size")),
        ("infer non-UTF-8 text", "POST", "/infer/fasttextdiff?image=cxr_000", {"params": b'{"text": "caf\xe9 \xff"}'},
         {}, 400, "UTF-8"),
        ("infer control characters", "POST", "/infer/fasttextdiff?image=cxr_000",
         {"params": json.dumps({"text": "a\x00b"})}, {}, 400, "control"),
        ("infer n_noise 0", "POST", "/infer/fasttextdiff?image=cxr_000", {"params": json.dumps({"n_noise": 0})}, {},
         400, "n_noise"),
        ("infer n_noise not a number", "POST", "/infer/fasttextdiff?image=cxr_000",
         {"params": json.dumps({"n_noise": "many"})}, {}, 400, "n_noise"),
        ("infer corrupt upload", "POST", "/infer/fasttextdiff", {}, {"file": ("corrupt.png", corrupt.read_bytes())},
         415, "cannot read"),
        ("upload corrupt image", "PUT", "/datastore/image?image=corrupt", {},
         {"file": ("corrupt.png", corrupt.read_bytes())}, 415, "cannot read"),
        ("upload empty volume", "PUT", "/datastore/image?image=empty", {},
         {"file": ("empty.nii.gz", empty.read_bytes())}, 415, "cannot read"),
        ("upload path traversal id", "PUT", "/datastore/image?image=..%2Fescaped", {}, {"file": ("good.png", png)},
         400, "invalid image id"),
        ("upload absolute path id", "PUT", "/datastore/image?image=%2Ftmp%2Fescaped", {}, {"file": ("good.png", png)},
         400, "invalid image id"),
        ("upload 1 MB text", "PUT", "/datastore/image?image=big_text", {"params": json.dumps({"text": big_text})},
         {"file": ("good.png", png)}, (400, 413), ("limit", "maximum size")),
        ("upload non-UTF-8 text", "PUT", "/datastore/image?image=bad_utf8", {"params": b'{"text": "\xc3\x28"}'},
         {"file": ("good.png", png)}, 400, "UTF-8"),
        ("upload text not a string", "PUT", "/datastore/image?image=num_text", {"params": json.dumps({"text": 42})},
         {"file": ("good.png", png)}, 400, "string"),
        ("upload unsupported type", "PUT", "/datastore/image?image=script", {}, {"file": ("x.exe", b"MZ")}, 415,
         "unsupported"),
        ("put info unknown image", "PUT", "/datastore/image/info?image=no_such_image",
         {"info": json.dumps({"text": REPORT})}, {}, 404, "not in the datastore"),
        ("put info 1 MB text", "PUT", "/datastore/image/info?image=cxr_000", {"info": json.dumps({"text": big_text})},
         {}, (400, 413), ("limit", "maximum size")),
        ("put info 100 kB text", "PUT", "/datastore/image/info?image=cxr_000",
         {"info": json.dumps({"text": big_text[:100_000]})}, {}, 413, "limit"),
        ("put info non-UTF-8", "PUT", "/datastore/image/info?image=cxr_000", {"info": b'{"text": "\xff\xfe"}'}, {},
         400, "UTF-8"),
        ("put info reserved key", "PUT", "/datastore/image/info?image=cxr_000",
         {"info": json.dumps({"fasttextdiff_uncertainty": {}})}, {}, 400, "set by the server"),
        ("put info malformed", "PUT", "/datastore/image/info?image=cxr_000", {"info": "{"}, {}, 400, "not valid JSON"),
        ("get info unknown image", "GET", "/datastore/image/info?image=no_such_image", {}, {}, 404,
         "not in the datastore"),
        ("label for unknown image", "PUT", "/datastore/label?image=no_such_image&tag=final", {},
         {"label": ("l.png", png)}, 404, "not in the datastore"),
        ("label of wrong shape", "PUT", "/datastore/label?image=cxr_000&tag=final", {},
         {"label": ("l.png", wrong_label.read_bytes())}, 422, "does not match"),
        ("label corrupt", "PUT", "/datastore/label?image=cxr_000&tag=final", {},
         {"label": ("l.png", corrupt.read_bytes())}, 415, "cannot read"),
        ("label tag traversal", "PUT", "/datastore/label?image=cxr_000&tag=..%2F..%2Fx", {}, {"label": ("l.png", png)},
         400, "invalid label tag"),
        ("next sample unknown strategy", "POST", "/activelearning/no_such_strategy", {}, {}, 404, "unknown strategy"),
        ("train unknown model", "POST", "/train/no_such_model?run_sync=true", {}, {}, 404, "unknown"),
        ("train bad epochs", "POST", "/train/fasttextdiff?run_sync=true", "json:" + json.dumps({"max_epochs": -3}), {},
         400, "max_epochs"),
        ("batch infer unknown model", "POST", "/batch/infer/no_such_model?run_sync=true", "json:{}", {}, 404,
         "unknown model"),
        ("scoring unknown method", "POST", "/scoring/no_such_method?run_sync=true", "json:{}", {}, 404,
         "unknown scoring"),
        ("remove unknown image", "DELETE", "/datastore/image?id=no_such_image", {}, {}, 404, "not in the datastore"),
    ]


def _send(server, method, path, fields, files):
    import requests

    url = server.url + path
    if isinstance(fields, str) and fields.startswith("json:"):
        return requests.request(method, url, data=fields[5:], headers={"content-type": "application/json"},
                                timeout=120)
    if files or fields:
        return requests.request(method, url, data=fields, files=files or None, timeout=120)
    return requests.request(method, url, timeout=120)


def test_bad_requests_get_4xx_with_reason_and_change_nothing(inprocess_server, good_png, tmp_path):
    before = _snapshot(inprocess_server)
    table = []
    for name, method, path, fields, files, status, words in _cases(good_png, tmp_path):
        response = _send(inprocess_server, method, path, fields, files)
        detail = response.json().get("detail") if "json" in response.headers.get("content-type", "") else response.text
        table.append((name, response.status_code, str(detail)[:120]))
        statuses = status if isinstance(status, tuple) else (status,)
        alternatives = words if isinstance(words, tuple) else (words,)
        assert response.status_code in statuses, f"{name}: {response.status_code} {detail}"
        assert any(w.lower() in str(detail).lower() for w in alternatives), \
            f"{name}: reason {detail!r} lacks {words!r}"
    after = _snapshot(inprocess_server)
    assert after == before, "a refused request changed the datastore, its files or the model"
    print("\n| request | status | reason |\n|---|---|---|")
    for row in table:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")


def test_report_text_is_not_logged_in_full(inprocess_server, good_png, caplog):
    """Patient reports stay out of INFO logs (MONAI Label logs whole requests there)."""
    import logging

    secret = "Patient John Doe, left lower lobe consolidation, unique-marker-7f3a."
    client = inprocess_server.client()
    with caplog.at_level(logging.INFO):
        client.upload_image(str(good_png), "logged_case", {"text": secret})
        client.infer("fasttextdiff", "logged_case", {"text": secret})
        client.next_sample("first", {})
    assert client.datastore()["objects"]["logged_case"]["image"]["info"]["text"] == secret
    assert caplog.records, "nothing was logged; the check would be vacuous"
    assert "unique-marker-7f3a" not in caplog.text


def test_good_requests_after_bad_ones_still_work(inprocess_server, good_png):
    client = inprocess_server.client()
    client.upload_image(str(good_png), "good_after", {"text": REPORT})
    _, result = client.infer("fasttextdiff", "good_after", {})
    assert result["text_source"] == "datastore"
