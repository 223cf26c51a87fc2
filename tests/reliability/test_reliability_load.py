"""A small run of the load benchmark (bench/load.py) against `monailabel start_server` on 127.0.0.1.

8 clients x 2 rounds (an infer with a stored, explicit or new report, then an info read or a label
save): nothing fails and every concurrent result equals its sequential one. The model and the text
encoder are loaded once by the server process, and every text cache file it wrote is intact.
The full benchmark (16 x 5) is `python bench/load.py --server URL --json bench/results/load.json`.
"""

from __future__ import annotations

import sys

import pytest

from server_fixtures import REPO

pytestmark = pytest.mark.server


def test_concurrent_load_matches_sequential_results(subprocess_server, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import load
    finally:
        sys.path.remove(str(REPO / "bench"))

    result = load.run(subprocess_server.url, clients=8, rounds=2, max_seconds=240, workdir=tmp_path / "load")
    assert result["requests"] == 8 * 2 * 2 and result["infer_requests"] == 16
    assert result["failed"] == 0, result["errors"]
    assert result["mismatched"] == 0, result["mismatches"]
    assert result["by_kind"]["save_label"]["count"] == 8 and result["by_kind"]["read_info"]["count"] == 8
    assert result["latency_s"]["p95_s"] >= result["latency_s"]["p50_s"] > 0 and result["throughput_rps"] > 0

    log = subprocess_server.log_tail(10**7)
    assert log.count("loaded model ") == 1, "the model was loaded more than once by the server process"

    from safetensors.torch import load as st_load

    from fasttextdiff.text.encoder import _safetensors_metadata, _states_sha256

    cache = subprocess_server.conf["state_dir"]
    files = list((__import__("pathlib").Path(cache) / "text_cache").rglob("*.safetensors"))
    assert len(files) >= 3, "the texts of the load run were not cached"
    for f in files:
        data = f.read_bytes()
        assert _safetensors_metadata(data)["sha256"] == _states_sha256(st_load(data)["states"]), f"{f.name} is damaged"


def test_load_refuses_a_non_loopback_server():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import load
    finally:
        sys.path.remove(str(REPO / "bench"))
    with pytest.raises(SystemExit, match="only loopback"):
        load.run("http://192.0.2.10:8000", clients=1, rounds=1)


def test_downloads_during_concurrent_saves_of_the_same_label_are_whole(subprocess_server, tmp_path):
    """Two versions of one label (60 B and 1 kB) saved over each other while others download it:
    every download is complete and equals one of the versions (no size/body mix-up)."""
    import gzip
    import threading

    import requests

    url, image, tag = subprocess_server.url, "cxr_000", "racetest"
    head = "NRRD0004\ntype: uint8\ndimension: 2\nsizes: 32 32\nencoding: {}\n\n"
    small = head.format("gzip").encode() + gzip.compress(bytes(1024), mtime=0)
    large = head.format("raw").encode() + bytes(range(256)) * 4
    versions = {small, large}
    requests.put(f"{url}/datastore/label?image={image}&tag={tag}", files={"label": ("l.nrrd", small)},
                 timeout=60).raise_for_status()
    errors: list[str] = []
    stop = threading.Event()

    def saver():
        for i in range(30):
            r = requests.put(f"{url}/datastore/label?image={image}&tag={tag}",
                             files={"label": ("l.nrrd", large if i % 2 else small)}, timeout=60)
            if r.status_code != 200:
                errors.append(f"save: {r.status_code} {r.text[:100]}")
        stop.set()

    def reader():
        while not stop.is_set():
            try:
                r = requests.get(f"{url}/datastore/label?label={image}&tag={tag}", timeout=60)
                if r.status_code != 200 or r.content not in versions:
                    errors.append(f"download: {r.status_code}, {len(r.content)} bytes")
            except requests.RequestException as exc:
                errors.append(f"download: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=saver)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    requests.delete(f"{url}/datastore/label?id={image}&tag={tag}", timeout=60)
    assert not errors, errors[:5]
