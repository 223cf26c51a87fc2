"""Where the server listens: loopback by default, anything else only with authentication.

These never bind a socket beyond 127.0.0.1: the bind check runs in the app's constructor, before
uvicorn opens its socket, and is exercised here on the command lines MONAI Label passes.
"""

from __future__ import annotations

import sys

import pytest

from server_fixtures import APP_DIR, REPO, make_tiny_studies


@pytest.fixture()
def security():
    sys.path.insert(0, str(APP_DIR))
    try:
        from lib import security as module
    finally:
        sys.path.remove(str(APP_DIR))
    return module


@pytest.mark.parametrize("argv, host", [
    (["main.py", "start_server", "--app", "a", "--studies", "s"], "0.0.0.0"),  # MONAI Label's default
    (["main.py", "start_server", "--host", "127.0.0.1"], "127.0.0.1"),
    (["main.py", "start_server", "-i", "10.0.0.5"], "10.0.0.5"),
    (["main.py", "start_server", "--host=::1"], "::1"),
    (["python", "-m", "monailabel.interfaces.utils.app", "-m", "train"], None),  # a task subprocess
    (["pytest", "tests"], None),
])
def test_bind_host_is_read_from_the_start_server_command_line(security, argv, host):
    assert security.bind_host_from_argv(argv) == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts_start_without_auth(security, host):
    assert security.check_bind_host(["x", "start_server", "--host", host], False, False) == host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "my-workstation.example.org"])
def test_non_loopback_hosts_need_auth_or_an_explicit_opt_in(security, host):
    argv = ["x", "start_server", "--host", host]
    with pytest.raises(ValueError, match="refusing to serve patient data.*MONAI_LABEL_AUTH_ENABLE.*allow_remote"):
        security.check_bind_host(argv, allow_remote=False, auth_enabled=False)
    assert security.check_bind_host(argv, allow_remote=False, auth_enabled=True) == host
    assert security.check_bind_host(argv, allow_remote=True, auth_enabled=False) == host


def test_the_app_refuses_to_start_on_all_interfaces_without_auth(tmp_path, monkeypatch):
    """The real app constructor, with the command line `monailabel start_server` gives it when
    --host is left out (MONAI Label then binds 0.0.0.0): the start stops with the sentence."""
    studies = make_tiny_studies(tmp_path / "studies", n_2d=2, n_3d=0, n_labeled=1)
    monkeypatch.setattr(sys, "argv", ["/venv/lib/monailabel/main.py", "start_server", "--app", str(APP_DIR),
                                      "--studies", str(studies)])
    sys.path.insert(0, str(APP_DIR))
    try:
        import main as app_main
    finally:
        sys.path.remove(str(APP_DIR))
    with pytest.raises(ValueError, match="refusing to serve patient data on --host 0.0.0.0"):
        app_main.FastTextDiffApp(str(APP_DIR), str(studies), {"state_dir": str(tmp_path / "state")})


def test_make_serve_and_the_docs_bind_loopback():
    makefile = (REPO / "Makefile").read_text()
    assert "HOST ?= 127.0.0.1" in makefile and "--host $(HOST)" in makefile
    for doc in ("docs/SERVER.md", "docs/RELIABILITY.md"):
        text = (REPO / doc).read_text()
        for line in text.splitlines():
            if "start_server" in line and "--host" in line:
                assert "--host 127.0.0.1" in line or "MONAI_LABEL_AUTH_ENABLE" in text, (doc, line)


def test_report_text_is_redacted_from_any_logger_that_reaches_the_server_log(tmp_path):
    """The server's log handlers redact `text` values whatever logger the record comes from
    (MONAI Label's known request loggers, their children, or any library's)."""
    import logging

    sys.path.insert(0, str(APP_DIR))
    try:
        from lib import redact
    finally:
        sys.path.remove(str(APP_DIR))
    log_file = tmp_path / "app.log"
    handler = logging.FileHandler(log_file)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        redact.install()
        secret = "Patient Max Mustermann, 1960-01-01, mass in the left kidney."
        logging.getLogger("monailabel.endpoints.infer").info("Infer Request: %s", {"model": "m", "text": secret})
        logging.getLogger("monailabel.endpoints.infer.sub").info("params: %s", {"text": secret})
        logging.getLogger("some.library").info('payload {"text": "%s", "n": 1}', secret)
        handler.flush()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    written = log_file.read_text()
    assert written.count("<report: ") == 3, written
    assert "Mustermann" not in written
