"""Bad input, server and CLI: crafted image files, report texts, request parameters, path traversal.

Every case of `reliability_cases.py` is sent to the real server (in-process uvicorn on
127.0.0.1, the tiny default model built on start) with `requests` or MONAI Label's client, and
the crafted files also to the `fasttextdiff segment` CLI entry point. Each must get its 4xx (exit
2 with `error:` for the CLI) and a reason, the datastore and studies folder stay unchanged, and the
server's memory stays bounded. Hypothesis adds generated report texts and parameter sets.
Each test compares the answers it observed with docs/RELIABILITY.md's table (same case list) and
fails when the doc is stale; `python tests/reliability_cases.py --update-doc` rewrites the table
from a run of this module. No test writes the doc.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import tracemalloc
import unicodedata
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reliability_cases as cases
from server_fixtures import ready_inprocess_server

UPLOAD_LIMIT_MB = 2  # small, so that the limit itself can be tested without sending a gigabyte

pytestmark = pytest.mark.server

OBSERVED: dict[str, tuple[int | str, str]] = {}
BASETEMP: list[str] = []  # pytest's temp root of this run, cut from the reasons in the table
HYPO = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IMAGE = "cxr_000"  # an image of the tiny studies


def _reason(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    return str(body.get("detail") if isinstance(body, dict) and "detail" in body else body)[:300]


def _normal(reason: str) -> str:
    """Reasons without the random temp-file names and folders, for the docs table."""
    for base in BASETEMP:  # a test's folder under the temp root (which differs between machines and runs)
        reason = re.sub(re.escape(base) + r"/[^/\s'\"]+/", "", reason)
    reason = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/(popen-gw\d+/)?[^/]+/", "",
                    reason)  # (xdist: a folder per worker)
    reason = re.sub(r"/[^\s'\"]*/(tmp[\w-]+)", "…/<upload>", reason)
    reason = re.sub(r"tmp[a-z0-9_]{6,}", "<upload>", reason)
    return reason


def _snapshot(server) -> dict:
    server.app.wait_for_background(120)
    studies = server.studies
    # image infos other than the report (scores) may change; the datastore's content is compared below
    files = {str(p.relative_to(studies)): p.stat().st_size for p in studies.rglob("*")
             if p.is_file() and p.name not in (".lock", "datastore_v2.json") and "uncertainty" not in p.parts}
    ds = server.client().datastore()
    objects = {k: {"text": v["image"]["info"].get("text"),
                   "labels": sorted(t for t in v["labels"] if t != "uncertainty")}
               for k, v in ds["objects"].items()}
    return {"objects": objects, "files": files, "neighbours": sorted(p.name for p in studies.parent.iterdir())}


def _requests():
    import requests

    return requests


def _check(group: str, name: str, response, expect: int, words: tuple[str, ...]) -> None:
    reason = _reason(response)
    shown = _normal(reason) if response.status_code >= 400 else "accepted"
    OBSERVED[cases.row_key(group, name)] = (response.status_code, shown)
    assert response.status_code == expect, f"{group} / {name}: {response.status_code} {reason}"
    if words:
        assert any(w.lower() in reason.lower() for w in words), f"{group} / {name}: {reason!r} lacks {words}"


@pytest.fixture(scope="module", autouse=True)
def _observed_answers(tmp_path_factory):
    """The temp root to cut from reasons; under `reliability_cases.py --update-doc` (which sets
    FASTTEXTDIFF_RELIABILITY_OBSERVED to a file outside the checkout), the answers this module observed
    go to that file for the script to write into the doc."""
    BASETEMP[:] = [str(tmp_path_factory.getbasetemp().resolve()), str(tmp_path_factory.getbasetemp())]
    yield
    target = os.environ.get(cases.OBSERVED_ENV)
    if target:
        Path(target).write_text(json.dumps(OBSERVED, indent=1, ensure_ascii=False), encoding="utf-8")


def _doc_is_current(keys) -> None:
    """The rows of docs/RELIABILITY.md's table for `keys` say what this run observed (status and reason).
    The doc is never written here: `reliability_cases.py --update-doc` regenerates it."""
    if os.environ.get(cases.OBSERVED_ENV):
        return  # a run of --update-doc: it writes the doc from these answers afterwards
    rows = set(cases.doc_table())
    stale = []
    for key in keys:
        group, name = key.split(": ", 1)
        line = cases.table_row(group, name, *OBSERVED[key])
        if line not in rows:
            documented = next((r for r in rows if r.startswith(f"| {group} | {name} |")), "(no row)")
            stale.append(f"  documented: {documented}\n  observed:   {line}")
    assert not stale, (f"docs/RELIABILITY.md is stale for {len(stale)} row(s); refresh it with "
                       f"`{cases.UPDATE_COMMAND}`:\n" + "\n".join(stale[:5]))


def _observed_since(before: set) -> list[str]:
    return [k for k in OBSERVED if k not in before]


@pytest.fixture(scope="module")
def inprocess_server(tiny_studies, tmp_path_factory):
    """The real server on 127.0.0.1, building its tiny default model, with a 2 MiB upload limit."""
    with ready_inprocess_server(tiny_studies, tmp_path_factory.mktemp("state"),
                                max_upload_mb=str(UPLOAD_LIMIT_MB)) as server:
        yield server


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("crafted")
    out = {}
    for case in cases.FILE_CASES:
        path = folder / case.filename
        path.write_bytes(case.build())
        out[case.name] = path
    return out


# ------------------------------------------------------------------------------ crafted files
MEMORY_LIMIT_MB = 300  # what serving the crafted files may add to the server's memory (docs/RELIABILITY.md)


class MemoryProbe:
    """What this process (the in-process server included) allocates while the block runs, above what it
    held when the block began, whatever it held before (the lifetime peak `ru_maxrss` cannot tell):

    - `rss_mb`: the peak resident set, sampled from /proc/self/statm every 2 ms (memory that C and C++
      readers, ITK or zlib, allocate and touch);
    - `traced_mb`: the peak of Python and NumPy allocations (tracemalloc), which counts a buffer even
      when its pages are never touched (a `np.empty` sized from a lying header).
    """

    def __enter__(self) -> "MemoryProbe":
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._was_tracing = tracemalloc.is_tracing()
        if not self._was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._traced0 = tracemalloc.get_traced_memory()[0]
        self._rss0 = self._peak = self._rss()
        self._thread = threading.Thread(target=self._sample, name="rss-probe", daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._peak = max(self._peak, self._rss())
        self.traced_mb = (tracemalloc.get_traced_memory()[1] - self._traced0) / 2**20
        if not self._was_tracing:
            tracemalloc.stop()
        self.rss_mb = (self._peak - self._rss0) / 2**20


def test_crafted_files_are_refused_by_upload_and_infer_with_bounded_memory(inprocess_server, crafted):
    requests = _requests()
    seen = set(OBSERVED)
    before = _snapshot(inprocess_server)
    payloads = {case.name: crafted[case.name].read_bytes() for case in cases.FILE_CASES}
    with MemoryProbe() as memory:
        for i, case in enumerate(cases.FILE_CASES):
            data = payloads[case.name]
            r = requests.put(f"{inprocess_server.url}/datastore/image?image=crafted_{i}",
                             files={"file": (case.filename, data)}, timeout=120)
            _check("upload image", case.name, r, case.expect, case.upload_words or case.words)
            r = requests.post(f"{inprocess_server.url}/infer/fasttextdiff", files={"file": (case.filename, data)},
                              timeout=120)
            _check("infer on an uploaded file", case.name, r, case.expect, case.words)
    print(f"\ncrafted files: resident set +{memory.rss_mb:.1f} MB, Python/NumPy allocations +{memory.traced_mb:.1f} "
          "MB")
    for what, grown in (("resident set", memory.rss_mb), ("Python/NumPy allocations", memory.traced_mb)):
        assert grown < MEMORY_LIMIT_MB, (f"the server's {what} grew by {grown:.0f} MB while answering "
                                         f"{len(cases.FILE_CASES)} tiny crafted files")
    assert _snapshot(inprocess_server) == before, "a refused upload changed the datastore or the studies folder"
    _doc_is_current(_observed_since(seen))


def test_crafted_files_are_refused_by_the_cli(inprocess_server, crafted, tmp_path, capsys):
    from fasttextdiff.commands.main import main

    seen = set(OBSERVED)

    model = inprocess_server.app.paths.served_model_dir()
    assert model is not None
    for case in cases.FILE_CASES:
        out = tmp_path / f"{case.filename}.mask.nii.gz"
        rc = main(["segment", str(crafted[case.name]), "--report", "left lung", "--model", str(model),
                   "--out", str(out), "--n-noise", "1"])
        err = capsys.readouterr().err
        OBSERVED[cases.row_key("CLI `fasttextdiff segment`", case.name)] = (
            f"exit {rc}", _normal(err.strip().splitlines()[-1] if err.strip() else ""))
        assert rc == 2, f"{case.name}: exit {rc}, stderr {err!r}"
        assert "error:" in err and "Traceback" not in err
        assert any(w.lower() in err.lower() for w in case.words), f"{case.name}: {err!r} lacks {case.words}"
        assert not out.exists()
    _doc_is_current(_observed_since(seen))


def test_mutated_png_uploads_never_500(inprocess_server):
    """Random truncations and byte flips of a valid PNG: accepted (200) or refused (415), never a
    server error, and the datastore only ever gains the accepted ones."""
    requests = _requests()
    good = cases.png_bytes(32, 32, seed=3)

    @HYPO
    @given(cut=st.integers(0, len(good)), flips=st.lists(st.tuples(st.integers(0, len(good) - 1),
                                                                     st.integers(1, 255)), max_size=4))
    def run(cut, flips):
        data = bytearray(good[:cut] if cut < len(good) else good)
        for pos, xor in flips:
            if pos < len(data):
                data[pos] ^= xor
        r = requests.put(f"{inprocess_server.url}/datastore/image?image=mutant",
                         files={"file": ("m.png", bytes(data))},
                         timeout=60)
        assert r.status_code in (200, 415), f"{r.status_code} {_reason(r)}"
        listed = "mutant" in inprocess_server.client().datastore()["objects"]
        assert listed == (r.status_code == 200)
        if listed:
            requests.delete(f"{inprocess_server.url}/datastore/image?id=mutant", timeout=60).raise_for_status()

    run()


# ------------------------------------------------------------------------------ report texts
def _put_info(server, image: str, payload: bytes):
    return _requests().put(f"{server.url}/datastore/image/info?image={image}", files={"info": (None, payload)},
                           timeout=60)


def _stored_text(server, image: str):
    return server.client().datastore()["objects"][image]["image"]["info"].get("text")


def test_report_text_cases(inprocess_server):
    seen = set(OBSERVED)
    for case in cases.TEXT_CASES:
        before = _stored_text(inprocess_server, IMAGE)
        r = _put_info(inprocess_server, IMAGE, case.payload)
        _check("report text (PUT /datastore/image/info)", case.name, r, case.expect, case.words)
        after = _stored_text(inprocess_server, IMAGE)
        if case.expect == 200:
            assert after == json.loads(case.payload)["text"], f"{case.name}: stored text differs"
        else:
            assert after == before, f"{case.name}: a refused report changed the stored one"
    _doc_is_current(_observed_since(seen))


def _acceptable(text: str, limit: int = cases.MAX_TEXT_BYTES) -> bool:
    """The documented rule, restated: UTF-8 encodable, printable (tab/newline allowed), within the limit."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    if "\ufffd" in text or size > limit:
        return False
    return not any(unicodedata.category(c) == "Cc" and c not in "\n\r\t" for c in text)


def test_generated_report_texts_round_trip_or_are_refused(inprocess_server, caplog):
    """Any text: stored and read back identically when acceptable, else 400/413 with the old text kept;
    never a 500, and never logged in full."""
    marker = "zq" + "x7" * 3  # a word no log line has by chance

    @HYPO
    @given(text=st.one_of(st.text(max_size=200),
                          st.text(alphabet=st.characters(codec="utf-8"), min_size=1,
                                  max_size=60).map(lambda t: marker + t),
                          st.sampled_from(["", " ", "\t\n", "Ω" * 40000, "😀" * 16385, "a\x7fb", "\u2028", "\x85"])))
    def run(text):
        before = _stored_text(inprocess_server, IMAGE)
        with caplog.at_level(logging.INFO):
            r = _put_info(inprocess_server, IMAGE, json.dumps({"text": text}).encode("utf-8"))
            if r.status_code == 200 and text.startswith(marker):
                _requests().post(f"{inprocess_server.url}/infer/fasttextdiff?image={IMAGE}&output=json",
                                 files={"params": (None, json.dumps({"n_noise": 1, "text": text}))}, timeout=120)
        assert r.status_code in (200, 400, 413), f"{r.status_code} {_reason(r)}"
        assert (r.status_code == 200) == _acceptable(text), f"{text!r}: {r.status_code} {_reason(r)}"
        assert _stored_text(inprocess_server, IMAGE) == (text if r.status_code == 200 else before)
        if len(text) > 12 and text.startswith(marker):
            assert text not in caplog.text

    run()


def test_generated_raw_bytes_reports(inprocess_server):
    """Arbitrary bytes inside the JSON string: not UTF-8 -> 400 naming UTF-8; else as the text rule says."""

    @HYPO
    @given(raw=st.binary(min_size=1, max_size=40).filter(lambda b: b'"' not in b and b"\\" not in b))
    def run(raw):
        r = _put_info(inprocess_server, IMAGE, b'{"text": "' + raw + b'"}')
        assert r.status_code in (200, 400, 413), f"{r.status_code} {_reason(r)}"
        try:
            text = json.loads(b'{"text": "' + raw + b'"}')["text"]
        except (UnicodeDecodeError, ValueError):
            text = None
        if text is None:
            assert r.status_code == 400
        else:
            assert (r.status_code == 200) == _acceptable(text), f"{raw!r}: {r.status_code} {_reason(r)}"

    run()


# ------------------------------------------------------------------------------ request params
def _infer(server, params: dict):
    return _requests().post(f"{server.url}/infer/fasttextdiff?image={IMAGE}&output=json",
                            files={"params": (None, json.dumps(params))}, timeout=120)


def _train(server, params: dict):
    return _requests().post(f"{server.url}/train/fasttextdiff?run_sync=true", data=json.dumps(params),
                            headers={"content-type": "application/json"}, timeout=300)


def test_param_cases(inprocess_server):
    seen = set(OBSERVED)
    before = _snapshot(inprocess_server)
    for case in cases.PARAM_CASES:
        r = _infer(inprocess_server, case.params) if case.route == "infer" else _train(inprocess_server, case.params)
        _check(f"{case.route} params", f"{case.name}: `{json.dumps(case.params)[:60]}`", r, case.expect, case.words)
    assert _snapshot(inprocess_server) == before
    _doc_is_current(_observed_since(seen))


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**15, 10**15), st.floats(allow_nan=False),
                    st.text(max_size=12), st.lists(st.integers(0, 3), max_size=2), st.just({"x": 1}))


def test_generated_infer_params(inprocess_server):
    """Random parameter sets: 200 exactly when every known key holds a valid value, else 400; never 500."""

    @HYPO
    @given(params=st.dictionaries(st.sampled_from(["n_noise", "result", "result_extension", "text", "zz_unknown"]),
                                  _VALUES, max_size=3))
    def run(params):
        params = dict(params, save_uncertainty=False)
        r = _infer(inprocess_server, params)
        assert r.status_code in (200, 400, 413), f"{params}: {r.status_code} {_reason(r)}"
        n = params.get("n_noise", 1)
        valid = (
            (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 32
             or isinstance(n, float) and n.is_integer() and 1 <= n <= 32
             or isinstance(n, str) and n.strip().isdigit() and 1 <= int(n) <= 32)
            and params.get("result", "label") in ("label", "uncertainty", None)
            and params.get("result_extension") in (None, "", ".nii.gz", ".nii", ".nrrd")
            and (params.get("text") in (None, "")
                 or isinstance(params.get("text"), str) and _acceptable(params["text"]))
        )
        assert (r.status_code == 200) == valid, f"{params}: {r.status_code} {_reason(r)}"

    run()


# ------------------------------------------------------------------------------ traversal
def test_path_traversal_ids_and_tags_are_refused(inprocess_server, tmp_path):
    requests = _requests()
    seen = set(OBSERVED)
    before = _snapshot(inprocess_server)
    png = cases.png_bytes(32, 32)
    for image_id in cases.TRAVERSAL_IDS:
        r = requests.put(f"{inprocess_server.url}/datastore/image?image={quote(image_id, safe='')}",
                         files={"file": ("x.png", png)}, timeout=60)
        _check("image id (upload)", f"`{image_id!r}`", r, 400, ("invalid image id",))
        r = requests.post(f"{inprocess_server.url}/infer/fasttextdiff?image={quote(image_id, safe='')}", timeout=60)
        assert r.status_code in (400, 404), f"infer {image_id!r}: {r.status_code}"
    for tag in cases.TRAVERSAL_TAGS:
        r = requests.put(f"{inprocess_server.url}/datastore/label?image={IMAGE}&tag={quote(tag, safe='')}",
                         files={"label": ("l.png", png)}, timeout=60)
        _check("label tag (save label)", f"`{tag!r}`", r, 400, ("invalid label tag",))
    assert _snapshot(inprocess_server) == before
    assert not Path("/tmp/escaped").exists() and not Path("/tmp/escaped.png").exists()
    _doc_is_current(_observed_since(seen))


def test_every_cli_format_uploads_and_reuploads_answer_as_documented(inprocess_server, tmp_path):
    """Each format the CLI reads is accepted by upload under the user's file name (and segmented);
    an upload to an existing id is refused (409) unless the client asks to replace; a replacement keeps
    the report, keeps a label that still fits, moves aside one that no longer does, and leaves one
    image file behind."""
    requests = _requests()
    seen = set(OBSERVED)
    url = inprocess_server.url
    for case in cases.FORMAT_CASES:
        r = requests.put(f"{url}/datastore/image", files={"file": (case.filename, case.build())},
                         data={"params": json.dumps({"text": "Unilateral pulmonary infection, upper left lung."})},
                         timeout=120)
        _check("upload format", case.name, r, 200, ())
        image_id = r.json()["image"]
        assert image_id == case.filename.split(".")[0], r.json()  # the user's file name is the id
        r = requests.post(f"{url}/infer/fasttextdiff?image={image_id}&output=json", timeout=300)
        assert r.status_code == 200, (case.name, r.text)
        requests.delete(f"{url}/datastore/image?id={image_id}", timeout=60)
    # the image every re-upload case targets: a 32x32 PNG with a report and a final label
    report = "Bilateral pulmonary infection, two infected areas."
    r = requests.put(f"{url}/datastore/image?image=reup", files={"file": ("reup.png", cases.png_bytes(32, 32))},
                     data={"params": json.dumps({"text": report})}, timeout=60)
    assert r.status_code == 200, r.text
    label = cases.png_bytes(32, 32, seed=9)
    assert requests.put(f"{url}/datastore/label?image=reup&tag=final", files={"label": ("l.png", label)},
                        timeout=60).status_code == 200
    studies = inprocess_server.studies
    for case in cases.REUPLOAD_CASES:
        query = "" if "no ?image=" in case.name else "?image=reup"
        r = requests.put(f"{url}/datastore/image{query}", files={"file": (case.filename, case.build())},
                         data={"params": json.dumps(case.params)}, timeout=60)
        _check("re-upload", case.name, r, case.expect, case.words)
        info = inprocess_server.client().datastore()["objects"]["reup"]
        assert info["image"]["info"]["text"] == report  # the report survives every answer
        assert len([p for p in studies.iterdir() if p.is_file() and p.name.split(".")[0] == "reup"]) == 1
        if case.expect == 200 and case.filename.endswith(".png"):
            assert r.json()["labels_kept"] == ["final"] and "final" in info["labels"]
        elif case.expect == 200:
            assert [m["tag"] for m in r.json()["labels_moved_aside"]] == ["final"] and "final" not in info["labels"]
    requests.delete(f"{url}/datastore/image?id=reup", timeout=60)
    _doc_is_current(_observed_since(seen))


def test_upload_limit_holds_for_streamed_bodies_and_allows_bodies_below_it(inprocess_server):
    """Chunked (no Content-Length) bodies are cut off at the limit; a valid image just below it is stored."""
    requests = _requests()
    limit = UPLOAD_LIMIT_MB * 2**20
    boundary = "b0undary"

    def body(total: int):
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n").encode()
        yield head
        sent = len(head)
        while sent < total:
            block = b"\0" * min(1 << 16, total - sent)
            sent += len(block)
            yield block

    r = requests.put(f"{inprocess_server.url}/datastore/image?image=streamed", data=body(limit + 2**20),
                     headers={"content-type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    key = cases.row_key("upload image", "streamed (chunked) body over the upload limit")
    OBSERVED[key] = (r.status_code, _normal(_reason(r)))
    assert r.status_code == 413 and "upload limit" in _reason(r)
    _doc_is_current([key])
    big = cases.png_bytes(1100, 1100, seed=5)  # ~1.2 MB of noise: under the limit, over Starlette's 1 MB spool
    assert 2**20 < len(big) < limit
    r = requests.put(f"{inprocess_server.url}/datastore/image?image=big_ok", files={"file": ("big.png", big)},
                     timeout=60)
    assert r.status_code == 200, _reason(r)
    stored = inprocess_server.studies / "big_ok.png"
    assert stored.read_bytes() == big
    requests.delete(f"{inprocess_server.url}/datastore/image?id=big_ok", timeout=60).raise_for_status()


def test_oversized_upload_is_refused_before_it_is_read(inprocess_server):
    """A body over --conf max_upload_mb gets 413 from its Content-Length (nothing is buffered)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", inprocess_server.port, timeout=30)
    limit = inprocess_server.app.app_conf.max_upload_mb * 2**20
    conn.putrequest("PUT", "/datastore/image?image=too_big")
    conn.putheader("content-type", "multipart/form-data; boundary=xyz")
    conn.putheader("content-length", str(limit + 1))
    conn.endheaders()
    response = conn.getresponse()  # answered without sending the body
    body = json.loads(response.read())
    conn.close()
    key = cases.row_key("upload image", "body over the upload limit (Content-Length)")
    OBSERVED[key] = (response.status, _normal(body["detail"]))
    assert response.status == 413 and "upload limit" in body["detail"]
    _doc_is_current([key])


# ------------------------------------------------------------------------------ the docs table
def test_docs_table_has_a_row_for_every_case_with_its_expected_status():
    """docs/RELIABILITY.md's table lists exactly the cases of reliability_cases.py, in order, each with
    the status the tests expect (the tests above compare the reasons they observe with the rows).
    Nothing is written: `reliability_cases.py --update-doc` regenerates the table."""
    def cells(line: str) -> tuple[str, ...]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return tuple(p.strip() for p in parts[:3])

    documented = [cells(line) for line in cases.doc_table()[2:]]
    expected = [cells(line) for line in cases.markdown().splitlines()[2:]]
    assert documented, f"docs/RELIABILITY.md has no generated table; create it with `{cases.UPDATE_COMMAND}`"
    missing = [e for e in expected if e not in documented]
    extra = [d for d in documented if d not in expected]
    assert documented == expected, (
        f"docs/RELIABILITY.md's table does not match the case lists (missing: {missing[:3]}, "
        f"not a case: {extra[:3]}); refresh it with `{cases.UPDATE_COMMAND}`"
    )


def test_generated_cli_reports(inprocess_server, tmp_path, capsys):
    """`fasttextdiff segment --report TEXT` / `--report-file` on a good image: exit 0 with a mask, or
    exit 2 with `error:` (a report that is not Unicode/UTF-8 text); never a traceback."""
    from fasttextdiff.commands.main import main

    model = str(inprocess_server.app.paths.served_model_dir())
    image = tmp_path / "good.png"
    image.write_bytes(cases.png_bytes(32, 32))

    @HYPO
    @given(
        text=st.one_of(st.text(max_size=80), st.sampled_from(["caf\udce9", "\x00\x1b[2J", "x" * 20000])),
        raw=st.one_of(st.none(), st.binary(max_size=40)),
    )
    def run(text, raw):
        out = tmp_path / "mask.png"
        out.unlink(missing_ok=True)
        args = ["segment", str(image), "--model", model, "--out", str(out), "--n-noise", "1"]
        if raw is not None:
            (tmp_path / "report.txt").write_bytes(raw)
            args += ["--report-file", str(tmp_path / "report.txt")]
        else:
            args += ["--report", text]
        rc = main(args)
        err = capsys.readouterr().err
        assert rc in (0, 2) and "Traceback" not in err, (rc, err[-500:])
        assert (rc == 0) == out.exists()
        if raw is not None:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                assert rc == 2 and "not UTF-8" in err
        elif any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            assert rc == 2 and "error:" in err

    run()
