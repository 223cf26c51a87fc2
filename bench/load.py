"""Load benchmark for the FastTextDiff MONAI Label server (loopback only, bounded).

    python bench/load.py --server http://127.0.0.1:8000 --json bench/results/load.json
    python bench/load.py --start studies/demo --json bench/results/load.json [--conf KEY VALUE ...]

N clients (threads, one MONAI Label client each) send R rounds each, concurrently: every round is
one report-conditioned infer on a 2D image of the datastore (stored report, or one of a few
explicit reports, some new to the server's text cache), followed by a datastore read
(`GET /datastore/image/info`) or a label save (`PUT /datastore/label`, tag `loadtest`, read back).
Afterwards the same infers are repeated one at a time; every concurrent result must equal its
sequential one (same mask voxels, same uncertainty within 1e-6), every saved label must read
back identical, every info read must return the stored report. The JSON gets the request count,
failed, mismatched, p50/p95 latency per kind and overall, throughput, and the sequential
latencies for comparison.

`--start STUDIES` launches `monailabel start_server --app monailabel_app --studies STUDIES
--uvicorn_app server:app --host 127.0.0.1` on a free port, waits until its model is ready, runs the
benchmark and stops it.
Only loopback servers are accepted: this tool sends bursts of requests and must not be pointed at
someone else's machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "lib") not in sys.path:
    sys.path.insert(0, str(ROOT / "lib"))
from fasttextdiff.utils.environment import apply_process_defaults  # noqa: E402

apply_process_defaults()  # offline, passive OpenMP

MODEL = "fasttextdiff"
TEXTS = [
    None,  # the report stored with the image
    "Unilateral pulmonary infection, one infected area, upper left lung.",
    "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
]
RASTER = (".png", ".jpg", ".jpeg")


def _is_loopback(url: str) -> bool:
    import ipaddress

    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 4)


def _summary(latencies: list[float]) -> dict:
    return {"count": len(latencies), "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
            "max_s": round(max(latencies), 4) if latencies else None,
            "mean_s": round(statistics.fmean(latencies), 4) if latencies else None}


class Runner:
    def __init__(self, url: str, workdir: Path, n_noise: int | None = None):
        from monailabel.client import MONAILabelClient

        self.url = url.rstrip("/")
        self.workdir = workdir
        self.n_noise = n_noise
        self._client_cls = MONAILabelClient
        ds = self.client().datastore()
        objects = ds["objects"]
        self.images = sorted(k for k, v in objects.items() if str(v["image"].get("ext", "")).lower() in RASTER)
        if not self.images:
            raise SystemExit("the server's datastore has no 2D images to segment")
        self.reports = {k: objects[k]["image"]["info"].get("text") for k in self.images}
        self.lock = threading.Lock()

    def client(self):
        return self._client_cls(self.url, tmpdir=tempfile.mkdtemp(dir=self.workdir, prefix="client-"))

    # ------------------------------------------------------------------ one request of each kind
    def infer(self, client, image: str, text: str | None) -> tuple[dict, Any]:
        from fasttextdiff.data.io import read_image

        params: dict[str, Any] = {"save_uncertainty": False}
        if text is not None:
            params["text"] = text
        if self.n_noise:
            params["n_noise"] = self.n_noise
        label_file, result = client.infer(MODEL, image, params)
        result = json.loads(result) if isinstance(result, str) else result
        mask = read_image(label_file).array
        os.unlink(label_file)
        return result, mask

    def read_info(self, client, image: str) -> bool:
        import requests

        r = requests.get(f"{self.url}/datastore/image/info?image={image}", timeout=120)
        r.raise_for_status()
        return r.json().get("text") == self.reports[image]

    def save_label(self, client, image: str, label_path: Path, tag: str) -> bool:
        import requests

        client.save_label(image, str(label_path), tag=tag)
        r = requests.get(f"{self.url}/datastore/label?label={image}&tag={tag}", timeout=120)
        r.raise_for_status()
        return r.content == label_path.read_bytes()


def _label_for(runner: Runner, image: str, seed: int) -> Path:
    """A valid label file for `image` (its shape), distinct per seed."""
    import numpy as np

    from fasttextdiff.data.io import read_image, write_image

    import requests

    r = requests.get(f"{runner.url}/datastore/image?image={image}", timeout=120)
    r.raise_for_status()
    path = runner.workdir / f"image-{image}-{seed}.png"
    path.write_bytes(r.content)
    shape_like = read_image(path)
    arr = (np.random.default_rng(seed).random(shape_like.array.shape[:2]) > 0.7).astype(np.uint8)
    out = runner.workdir / f"label-{image}-{seed}.nrrd"
    write_image(out, arr, like=shape_like)
    return out


def run(url: str, clients: int = 16, rounds: int = 5, n_noise: int | None = None, max_seconds: float = 600.0,
        workdir: Path | None = None) -> dict:
    """The benchmark against a live server; returns the result record."""
    if not _is_loopback(url):
        raise SystemExit(f"refusing to load-test {url}: only loopback servers (127.0.0.1, ::1, localhost)")
    own_tmp = workdir is None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fasttextdiff-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(url, clients, rounds, n_noise, max_seconds, workdir)
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(url, clients, rounds, n_noise, max_seconds, workdir) -> dict:
    runner = Runner(url, workdir, n_noise)
    images = runner.images[:8]
    fresh = f"Load test report {int(time.time())}: consolidation, right lower lobe."  # new to the text cache
    texts = TEXTS + [fresh]
    plan = [[(images[(c + r) % len(images)], texts[(c // 2 + 3 * r) % len(texts)]) for r in range(rounds)]
            for c in range(clients)]
    labels = {(c, r): _label_for(runner, plan[c][r][0], c * 1000 + r) for c in range(clients) for r in range(rounds)
              if r % 2 == 1}
    warm = runner.client()
    runner.infer(warm, images[0], TEXTS[1])  # model load, not measured

    records: list[dict] = []
    deadline = time.time() + max_seconds

    def one_client(c: int) -> None:
        client = runner.client()
        for r, (image, text) in enumerate(plan[c]):
            if time.time() > deadline:
                records.append({"kind": "infer", "ok": False, "error": "benchmark time limit", "c": c, "r": r})
                continue
            for kind in ("infer", "save_label" if r % 2 else "read_info"):
                t0 = time.perf_counter()
                rec: dict[str, Any] = {"kind": kind, "c": c, "r": r, "image": image, "text": text}
                try:
                    if kind == "infer":
                        result, mask = runner.infer(client, image, text)
                        rec.update(mask=mask, uncertainty=result["uncertainty"]["mean"], source=result["text_source"])
                        rec["ok"] = True
                    elif kind == "read_info":
                        rec["ok"], rec["match"] = True, runner.read_info(client, image)
                    else:
                        # one tag per client: a read-back must see this client's own save
                        rec["ok"], rec["match"] = True, runner.save_label(client, image, labels[(c, r)],
                                                                          f"loadtest{c}")
                except Exception as exc:  # noqa: BLE001 - counted as failed
                    rec.update(ok=False, error=f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
                rec["latency"] = time.perf_counter() - t0
                with runner.lock:
                    records.append(rec)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - started

    # the same infers, one at a time
    seq: dict[tuple, tuple] = {}
    seq_latency: list[float] = []
    client = runner.client()
    for image, text in sorted({(i, t) for row in plan for i, t in row}, key=lambda p: (p[0], str(p[1]))):
        t0 = time.perf_counter()
        result, mask = runner.infer(client, image, text)
        seq_latency.append(time.perf_counter() - t0)
        seq[(image, text)] = (mask, result["uncertainty"]["mean"])

    mismatches = []
    for rec in records:
        if not rec.get("ok"):
            continue
        if rec["kind"] == "infer":
            mask, unc = seq[(rec["image"], rec["text"])]
            same = rec["mask"].shape == mask.shape and bool((rec["mask"] == mask).all()) and \
                abs(float(rec["uncertainty"]) - float(unc)) <= 1e-6
            if not same:
                mismatches.append({"kind": "infer", "image": rec["image"], "client": rec["c"], "round": rec["r"]})
        elif not rec.get("match"):
            mismatches.append({"kind": rec["kind"], "image": rec["image"], "client": rec["c"], "round": rec["r"]})

    import requests

    for rec in records:  # remove the load test's labels again
        if rec["kind"] == "save_label" and rec.get("ok"):
            requests.delete(f"{runner.url}/datastore/label?id={rec['image']}&tag=loadtest{rec['c']}", timeout=120)

    latencies = [r["latency"] for r in records if "latency" in r]
    by_kind = {k: _summary([r["latency"] for r in records if r["kind"] == k and r.get("ok")])
               for k in ("infer", "read_info", "save_label")}
    info = runner.client().info()
    failed = [r for r in records if not r.get("ok")]
    return {
        "server": runner.url,
        "clients": clients,
        "rounds_per_client": rounds,
        "requests": len(records),
        "infer_requests": sum(r["kind"] == "infer" for r in records),
        "failed": len(failed),
        "mismatched": len(mismatches),
        "latency_s": _summary(latencies),
        "by_kind": by_kind,
        "throughput_rps": round(len(records) / wall, 2),
        "infer_throughput_rps": round(sum(r["kind"] == "infer" for r in records) / wall, 2),
        "wall_s": round(wall, 2),
        "sequential_infer": _summary(seq_latency),
        "distinct_infers": len(seq),
        "images": images,
        "texts": ["<stored report>" if t is None else f"<{len(t)} chars>" for t in texts],
        "model_identity": info.get("fasttextdiff", {}).get("model_identity"),
        "n_noise": n_noise or info.get("fasttextdiff", {}).get("conf", {}).get("n_noise"),
        "errors": sorted({r.get("error", "") for r in failed})[:10],
        "mismatches": mismatches[:10],
        "machine": {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "platform": platform.platform()},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------- --start: own server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(studies: Path, conf: list[tuple[str, str]], log: Path, timeout: float = 900.0):
    import urllib.request

    port = _free_port()
    exe = Path(sys.executable).with_name("monailabel")
    cmd = [str(exe), "start_server", "--app", str(ROOT / "monailabel_app"), "--studies", str(studies),
           "--uvicorn_app", "server:app", "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf:
        cmd += ["--conf", key, value]
    env = dict(os.environ, MONAILABEL_PYEXE=sys.executable,
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "monailabel_app"), os.environ.get("PYTHONPATH", ""))
                                          if p))  # `server:app` is monailabel_app/server.py
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{url}/info/", timeout=5) as r:  # noqa: S310 - loopback
                state = json.loads(r.read()).get("fasttextdiff", {}).get("model", {})
            if state.get("state") == "ready":
                return proc, url
            if state.get("state") == "failed":
                raise SystemExit(f"the server could not build its model: {state.get('message')}")
        except (OSError, ValueError):
            pass
        time.sleep(2)
    stop_server(proc)
    raise SystemExit(f"the server's model was not ready after {timeout}s; see {log}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="URL of a running server on this machine (loopback only)")
    where.add_argument("--start", type=Path, metavar="STUDIES", help="start a server on these studies first")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="--conf options for --start")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per client (one infer + one datastore request each)")
    parser.add_argument("--n-noise", type=int, help="noise draws per infer (default: the server's)")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    parser.add_argument("--json", type=Path, help="write the result here (e.g. bench/results/load.json)")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.rounds <= 50:
        parser.error("--clients must be in 1..64 and --rounds in 1..50 (a bounded benchmark)")

    proc = None
    url = args.server
    if args.start:
        log = Path(tempfile.mkdtemp(prefix="fasttextdiff-load-server-")) / "server.log"
        print(f"starting a server on {args.start} (log: {log}) ...", file=sys.stderr)
        proc, url = start_server(args.start, [tuple(c) for c in args.conf], log)
    try:
        result = run(url, clients=args.clients, rounds=args.rounds, n_noise=args.n_noise, max_seconds=args.max_seconds)
    finally:
        if proc is not None:
            stop_server(proc)
    result["command"] = "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.start:
        result["server_started"] = {"studies": str(args.start), "conf": dict(args.conf)}
    text = json.dumps(result, indent=2)
    if args.json:
        from fasttextdiff.utils.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, (text + "\n").encode("utf-8"))
    print(text)
    return 0 if result["failed"] == 0 and result["mismatched"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
