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
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "HOST ?= 127.0.0.1" in makefile and "--host $(HOST)" in makefile
    for doc in ("docs/SERVER.md", "docs/RELIABILITY.md"):
        text = (REPO / doc).read_text(encoding="utf-8")
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
    written = log_file.read_text(encoding="utf-8")
    assert written.count("<report: ") == 3, written
    assert "Mustermann" not in written


# ------------------------------------------------------------------------------ authentication on
@pytest.fixture(scope="module")
def realm():
    """A stand-in for a Keycloak realm on 127.0.0.1: it publishes an RSA public key, the test signs
    tokens with the private key (what Keycloak does after a login)."""
    import base64
    import http.server
    import json
    import threading

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    body = json.dumps({"realm": "test", "public_key": base64.b64encode(der).decode()}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    yield {"uri": f"http://127.0.0.1:{httpd.server_address[1]}/realms/test", "key": key, "public_pem": pem}
    httpd.shutdown()


def _token(realm, roles, username="someone", exp_in=600, key=None) -> str:
    import time

    import jwt

    claims = {"preferred_username": username, "realm_access": {"roles": roles}, "exp": int(time.time()) + exp_in}
    return jwt.encode(claims, key or realm["key"], algorithm="RS256")


def _hs256_with_public_key(realm, roles) -> str:
    """The algorithm-confusion attack: HMAC-sign with the (public) key the server verifies with."""
    import base64
    import hashlib
    import hmac
    import json
    import time

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"preferred_username": "mallory", "realm_access": {"roles": roles},
                           "exp": int(time.time()) + 600}).encode())
    sig = hmac.new(realm["public_pem"], f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def _start_auth_server(realm_uri: str, root, model_root):
    import subprocess

    import requests

    from server_fixtures import TINY_CONF, SubprocessServer, _server_env, wait_for

    studies = make_tiny_studies(root / "studies", n_2d=3, n_3d=0, n_labeled=1, seed=9)
    conf = dict(TINY_CONF, model_dir=str(model_root), prepare_default_model="false", state_dir=str(root / "state"))
    server = SubprocessServer(studies, conf, root / "server.log")
    env = _server_env(studies, conf, server.port)
    env.update(MONAI_LABEL_AUTH_ENABLE="true", MONAI_LABEL_AUTH_REALM_URI=realm_uri, MONAI_LABEL_AUTH_TIMEOUT="3")
    server._log = open(server.log_path, "wb")
    server.proc = subprocess.Popen(server.command(), stdout=server._log, stderr=subprocess.STDOUT, env=env,
                                   cwd=str(REPO), start_new_session=True)

    def up():
        assert server.proc.poll() is None, server.log_tail()
        return requests.get(f"{server.url}/auth/", timeout=5).json().get("enabled") is True

    try:
        wait_for(up, 180, 0.5, "the server with authentication on")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def auth_server(realm, tmp_path_factory, tiny_model_root):
    server = _start_auth_server(realm["uri"], tmp_path_factory.mktemp("auth"), tiny_model_root)
    try:
        yield server
    finally:
        server.stop()


def test_with_authentication_on_an_unreachable_realm_fails_closed(realm, tmp_path, tiny_model_root):
    import requests

    from server_fixtures import free_port

    server = _start_auth_server(f"http://127.0.0.1:{free_port()}/realms/gone", tmp_path, tiny_model_root)
    try:
        r = requests.get(f"{server.url}/info/",
                         headers={"Authorization": f"Bearer {_token(realm, ['monailabel-admin'])}"},
                         timeout=60)
        assert r.status_code == 503 and "authentication server" in r.json()["detail"]
        assert requests.get(f"{server.url}/info/", timeout=60).status_code == 401
    finally:
        server.stop()


def test_with_authentication_on_tokens_and_roles_are_enforced_on_the_apps_routes(auth_server, realm):
    """MONAI Label's auth (RBAC) still guards the routes the app re-registered, and valid realm
    tokens work (MONAI Label 0.8.5 alone rejects every token under PyJWT 2)."""
    import requests

    from reliability_cases import png_bytes

    url = auth_server.url
    user, annotator, admin = (_token(realm, [r]) for r in ("monailabel-user", "monailabel-annotator",
                                                           "monailabel-admin"))
    from cryptography.hazmat.primitives.asymmetric import rsa

    forged = _token(realm, ["monailabel-admin"], key=rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def call(method, path, token=None, **kw):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, url + path, headers=headers, timeout=120, **kw).status_code

    label = {"label": ("l.png", png_bytes(32, 32))}
    assert call("GET", "/info/") == 401
    assert call("POST", "/infer/fasttextdiff?image=cxr_000&output=json") == 401
    assert call("GET", "/datastore/image/info?image=cxr_000") == 401
    for bad in (forged, _token(realm, ["monailabel-admin"], exp_in=-60),
                _hs256_with_public_key(realm, ["monailabel-admin"]),
                "not-a-jwt"):
        assert call("GET", "/info/", bad) == 401
        assert call("PUT", "/datastore/label?image=cxr_000&tag=final", bad, files=label) == 401
    assert call("GET", "/info/", user) == 200
    assert call("POST", "/infer/fasttextdiff?image=cxr_000&output=json", user) == 200
    assert call("PUT", "/datastore/label?image=cxr_000&tag=final", user, files=label) == 403
    assert call("POST", "/train/fasttextdiff?run_sync=true", annotator, json={"max_epochs": -1}) == 403
    assert call("PUT", "/datastore/label?image=cxr_000&tag=final", annotator, files=label) == 200
    assert call("POST", "/train/fasttextdiff?run_sync=true", admin,
                json={"max_epochs": -1}) == 400  # admin reaches the check
