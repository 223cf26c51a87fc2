"""Reusable pieces to run the real FastTextDiff MONAI Label server in tests.

tests/conftest.py registers the fixtures below for every test module (`pytest_plugins`); test modules
import only the plain functions:

* `make_tiny_studies(dir)` — a small demo studies folder (32 px, a few 2D images + 1 volume).
* `TINY_CONF` — `--conf` values for tiny, fast models (widths 8/16, 32 px, 1-2 epochs).
* `build_tiny_model(studies, out)` — a ready model publish root built from the studies with the
  app's own training workflows, for `--conf model_dir`.
* `InProcessServer` — the real app (monailabel_app/server.py: `monailabel.app` with ours installed)
  served by uvicorn in a thread on a 127.0.0.1 socket bound to port 0 (the kernel picks a free port:
  no race with other test processes; MONAI Label's client needs a socket), plus a `TestClient` on
  the same app.
* `SubprocessServer` — `monailabel start_server ... --uvicorn_app server:app --host 127.0.0.1` as a
  child process, on a free port; a start that loses the port to another process (EADDRINUSE) is
  retried on another one.

The servers run the app's default configuration (the default text fusion included): a test about
another setting passes it as `--conf`. Every server leaves nothing in the temp folder: its MONAI
Label clients' result folders are removed when it stops, and `monailabel start_server` gets a
logging config in the server's own log folder (without `--log_config`, MONAI Label writes a
`tmp*.json` into the temp folder on every start and never removes it).

Module-scoped pytest fixtures at the end: `tiny_studies`, `tiny_model_root`, `inprocess_server`,
`subprocess_server`. Everything is real; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "monailabel_app"

# tiny, fast models: widths 8/16, 32 px inputs, 1-2 epochs, 2 noise draws
TINY_CONF: dict[str, str] = {
    "image_size": "32",
    "backbone_channels": "8,16",
    "timesteps": "50,150",
    "n_noise": "2",
    "epochs": "2",
    "backbone_epochs": "1",
    "batch_size": "4",
    "pretrain_slices_per_volume": "2",
    "device": "cpu",
    # no "text_residual": the servers under test run the default fusion ("zero"), as users get it
}


def free_port() -> int:
    """A port that was free a moment ago. Another process may take it before the caller binds it:
    `InProcessServer` binds port 0 itself instead, `SubprocessServer` retries on EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bound_socket() -> socket.socket:
    """A 127.0.0.1 TCP socket bound to a port the kernel chose (uvicorn listens on it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def monailabel_log_config(out: Path, app_dir: Path = APP_DIR) -> Path:
    """MONAI Label's own logging config for `start_server`, written to `out` (pass it as --log_config).

    Without --log_config, `monailabel start_server` copies its default config into a new
    `tempfile.NamedTemporaryFile(suffix=".json").name` on every start and never removes it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ftd_log_config", APP_DIR / "lib" / "log_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_log_config(out, app_dir)


class _ClientFolders:
    """Result folders for MONAI Label clients, all under one folder that `remove()` deletes."""

    def __init__(self) -> None:
        self.root: Path | None = None

    def new(self) -> str:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="mlclient-"))
        return tempfile.mkdtemp(dir=self.root)

    def remove(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def make_tiny_studies(out: Path, n_2d: int = 6, n_3d: int = 1, n_labeled: int = 3, seed: int = 0) -> Path:
    from fasttextdiff.data.demo_studies import make_demo_studies

    make_demo_studies(out, n_2d=n_2d, n_3d=n_3d, size=32, n_labeled=n_labeled, n_labeled_3d=min(1, n_3d),
                      volume_size=32, volume_slices=6, seed=seed)
    return Path(out)


def build_tiny_model(studies: Path, out_root: Path, conf: dict[str, str] | None = None) -> Path:
    """A published model root (versions/ + current) trained on `studies` by the app's workflows."""
    sys.path.insert(0, str(APP_DIR))
    try:
        from monailabel.datastore.local import LocalDatastore

        from lib.configs.app_conf import AppConf
        from lib.model_manager import ModelPaths
        from lib.training import pretrain_backbone_from_datastore, train_segmenter_from_datastore
    finally:
        sys.path.remove(str(APP_DIR))
    conf_values = dict(TINY_CONF, **(conf or {}))
    conf_values["model_dir"] = str(out_root)
    conf_values["state_dir"] = str(Path(out_root).parent / f".{Path(out_root).name}-state")
    app_conf = AppConf.from_conf(conf_values)
    paths = ModelPaths.from_conf(app_conf, str(studies), str(APP_DIR))
    ds = LocalDatastore(str(studies), extensions=["*.nii.gz", "*.nii", "*.nrrd", "*.png", "*.jpg"], auto_reload=False)
    pretrain_backbone_from_datastore(ds, app_conf, paths, epochs=app_conf.backbone_epochs, batch_size=8, device="cpu")
    train_segmenter_from_datastore(ds, app_conf, paths, epochs=app_conf.epochs, batch_size=app_conf.batch_size,
                                   lr=app_conf.lr, device="cpu")
    return Path(out_root)


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


def http_json(server, method: str, path: str, body=None) -> tuple[int, Any]:
    """One request through MONAI Label's own client: (status, parsed JSON or the text)."""
    from monailabel.client.client import MONAILabelUtils

    status, response, _, _ = MONAILabelUtils.http_method(method, server.url, path, body)
    text = response.decode() if isinstance(response, bytes) else response
    return status, (json.loads(text) if text and text[0] in "[{" else text)


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition") -> Any:
    end = time.time() + timeout
    last_exc: Exception | None = None
    while time.time() < end:
        try:
            value = predicate()
            if value:
                return value
        except _ServerExited:
            raise  # the server process is gone: waiting longer cannot help
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for "
                       f"{what}" + (f" (last error: {last_exc})" if last_exc else ""))


def wait_model_ready(url: str, timeout: float = 300.0) -> dict:
    """Poll /info until the app reports its model ready; fail fast if the build failed."""

    def ready():
        info = _get_json(f"{url}/info/")
        model = info.get("fasttextdiff", {}).get("model", {})
        if model.get("state") == "failed":
            raise AssertionError(f"default model build failed: {model}")
        return info if model.get("state") == "ready" else None

    return wait_for(ready, timeout, 1.0, "the model to be ready")


def _server_env(studies: Path, conf: dict[str, str], port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "MONAI_LABEL_APP_DIR": str(APP_DIR),
        "MONAI_LABEL_STUDIES": str(studies),
        "MONAI_LABEL_APP_CONF": json.dumps(conf),
        "MONAI_LABEL_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # MONAI Label's `monailabel` launcher runs `python` from PATH unless told which interpreter
        "MONAILABEL_PYEXE": sys.executable,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(p for p in (str(APP_DIR), str(REPO / "lib"), env.get("PYTHONPATH", "")) if p),
    })
    return env


@dataclass
class InProcessServer:
    """The real MONAI Label FastAPI app in this process, on uvicorn in a thread (127.0.0.1)."""

    studies: Path
    conf: dict[str, str]
    port: int = 0  # set by start(): the port the kernel gave the server's socket
    _server: Any = None
    _thread: threading.Thread | None = None
    _socket: socket.socket | None = None
    _saved_env: dict[str, str | None] = field(default_factory=dict)
    _clients: _ClientFolders = field(default_factory=_ClientFolders)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "InProcessServer":
        import uvicorn
        from monailabel.config import settings
        from monailabel.interfaces.utils.app import clear_cache

        self._socket = bound_socket()
        self.port = self._socket.getsockname()[1]
        env = _server_env(self.studies, self.conf, self.port)
        for key in ("MONAI_LABEL_APP_DIR", "MONAI_LABEL_STUDIES", "MONAI_LABEL_APP_CONF", "MONAI_LABEL_SERVER_PORT",
                    "PYTHONPATH"):
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = env[key]
        settings.MONAI_LABEL_APP_DIR = str(APP_DIR)
        settings.MONAI_LABEL_STUDIES = str(self.studies)
        settings.MONAI_LABEL_APP_CONF = dict(self.conf)
        settings.MONAI_LABEL_SERVER_PORT = self.port
        clear_cache()
        if str(APP_DIR) not in sys.path:
            sys.path.append(str(APP_DIR))
        import server  # monailabel_app/server.py, what `--uvicorn_app server:app` serves

        config = uvicorn.Config(server.build(), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="uvicorn-test", daemon=True)
        self._thread.start()
        wait_for(lambda: _get_json(f"{self.url}/info/"), timeout, 0.3, "the in-process server")
        return self

    @property
    def app(self):
        """The FastTextDiffApp instance the server uses."""
        from monailabel.interfaces.utils.app import app_instance

        return app_instance()

    def client(self):
        """MONAI Label's client with its own result folder: it saves results under the server's
        file name, and on one machine the server's temp file of the same name is deleted after
        the response is sent."""
        from monailabel.client import MONAILabelClient

        return MONAILabelClient(self.url, tmpdir=self._clients.new())

    def test_client(self):
        """A FastAPI TestClient on the same app (no lifespan: the uvicorn thread already ran it)."""
        import server
        from fastapi.testclient import TestClient

        return TestClient(server.app, raise_server_exceptions=False)

    def stop(self) -> None:
        from monailabel.interfaces.utils.app import clear_cache

        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        try:
            self.app.wait_for_background(30)
        except Exception:  # noqa: BLE001
            pass
        clear_cache()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._clients.remove()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _ServerExited(Exception):
    def __init__(self, returncode: int):
        super().__init__(returncode)
        self.returncode = returncode


def _port_taken(log: str) -> bool:
    """uvicorn's message when the port is taken: `[Errno 98] error while attempting to bind on address
    ('127.0.0.1', P): address already in use`."""
    return "address already in use" in log.lower() or "errno 98" in log.lower()


@dataclass
class SubprocessServer:
    """`monailabel start_server --app monailabel_app --studies DIR --host 127.0.0.1 --port P --conf ...`."""

    studies: Path
    conf: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    _clients: _ClientFolders = field(default_factory=_ClientFolders)

    @property
    def log_config(self) -> Path:
        """The logging config this server's `start_server` reads (beside its log)."""
        return self.log_path.with_name(self.log_path.name + ".logging.json")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        exe = Path(sys.executable).with_name("monailabel")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        monailabel_log_config(self.log_config)
        cmd = [str(exe), "start_server", "--app", str(APP_DIR), "--studies", str(self.studies), "--uvicorn_app",
               "server:app", "--host", "127.0.0.1", "--port", str(self.port), "--log_config", str(self.log_config)]
        for key, value in self.conf.items():
            cmd += ["--conf", key, str(value)]
        return cmd

    def start(self, timeout: float = 180.0, attempts: int = 5) -> "SubprocessServer":
        """Start and wait until this server answers. `free_port()` checks then the child binds: another
        process can take the port in between. The child then exits with EADDRINUSE and the start is
        retried on another port; and `/info` counts only once this child's uvicorn has said that it
        listens on the port (another process's server on that port must not pass for this one)."""
        for attempt in range(1, attempts + 1):
            env = _server_env(self.studies, self.conf, self.port)
            cmd = self.command()
            self._log = open(self.log_path, "wb")
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         cwd=str(REPO), start_new_session=True)
            listening = f"Uvicorn running on {self.url}"

            def up():
                if self.proc.poll() is not None:
                    raise _ServerExited(self.proc.returncode)
                return listening in self.log_tail(10**7) and _get_json(f"{self.url}/info/")

            try:
                wait_for(up, timeout, 0.5, f"monailabel start_server on port {self.port}")
                return self
            except _ServerExited as exc:
                self.stop()
                if attempt < attempts and _port_taken(self.log_tail(10**7)):
                    self.port = free_port()
                    continue
                raise RuntimeError(f"server exited with {exc.returncode}: {self.log_tail()}") from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def client(self):
        from monailabel.client import MONAILabelClient

        return MONAILabelClient(self.url, tmpdir=self._clients.new())

    def stop(self) -> None:
        """SIGTERM the server's own process group (it and the training subprocesses it started); remove its
        clients' result folders."""
        self._clients.remove()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()


# ---------------------------------------------------------------- pytest fixtures (module scope)
@pytest.fixture(scope="module")
def tiny_studies(tmp_path_factory) -> Path:
    return make_tiny_studies(tmp_path_factory.mktemp("studies") / "demo")


@pytest.fixture(scope="module")
def tiny_model_root(tmp_path_factory, pristine_tiny_model_root) -> Path:
    """This module's own copy of the tiny model (tests/conftest.py builds it once per test process)."""
    return shutil.copytree(pristine_tiny_model_root, tmp_path_factory.mktemp("model") / "root", symlinks=True)


@contextlib.contextmanager
def ready_inprocess_server(studies: Path, state_dir: Path, **conf: str) -> Iterator[InProcessServer]:
    """A real server on 127.0.0.1 (tiny conf + `conf`), once its default model is ready; stopped after."""
    server = InProcessServer(studies, dict(TINY_CONF, state_dir=str(state_dir), **conf)).start()
    try:
        wait_model_ready(server.url, timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def inprocess_server(tiny_studies, tmp_path_factory) -> Iterator[InProcessServer]:
    """A real server that builds its default model from `tiny_studies` on start (tiny conf)."""
    with ready_inprocess_server(tiny_studies, tmp_path_factory.mktemp("state")) as server:
        yield server


@pytest.fixture(scope="module")
def subprocess_server(tmp_path_factory, tiny_model_root) -> Iterator[SubprocessServer]:
    """`monailabel start_server` on fresh tiny studies, serving `tiny_model_root` via --conf model_dir."""
    studies = make_tiny_studies(tmp_path_factory.mktemp("sub-studies") / "demo", seed=2)
    conf = dict(TINY_CONF, model_dir=str(tiny_model_root), prepare_default_model="false",
                state_dir=str(tmp_path_factory.mktemp("sub-state")))
    server = SubprocessServer(studies, conf, tmp_path_factory.mktemp("logs") / "server.log").start()
    try:
        yield server
    finally:
        server.stop()


class OpenWatch:
    """Records every open of a file under `folder` (Linux inotify through watchdog): proof that a
    file was, or was never, read while the watch ran."""

    def __init__(self, folder: Path):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers.inotify import InotifyObserver

        self.opened: list[str] = []
        lock = threading.Lock()
        outer = self

        class Handler(FileSystemEventHandler):
            def on_opened(self, event):
                with lock:
                    outer.opened.append(event.src_path)

        self.observer = InotifyObserver()
        self.observer.schedule(Handler(), str(folder), recursive=True)

    def __enter__(self) -> "OpenWatch":
        self.observer.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)  # let the last events arrive
        self.observer.stop()
        self.observer.join(5)


def copy_studies(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst
