"""Where the server listens: loopback unless authentication is on (or explicitly allowed).

MONAI Label's `start_server` binds 0.0.0.0 when `--host` is not given, and its authentication is
off unless `MONAI_LABEL_AUTH_ENABLE=true`: anyone on the network could then read the patient
images and reports in the datastore. The app refuses that combination at start with a sentence
saying what to do; `make serve` and the docs bind 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

MONAI_LABEL_DEFAULT_HOST = "0.0.0.0"


def bind_host_from_argv(argv: Sequence[str]) -> str | None:
    """The --host of a `monailabel start_server` command line (MONAI Label's default when absent),
    or None when this process is not started that way (tests, task subprocesses)."""
    argv = list(argv)
    if "start_server" not in argv:
        return None
    host = MONAI_LABEL_DEFAULT_HOST
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    return host


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_host(argv: Sequence[str], allow_remote: bool, auth_enabled: bool) -> str | None:
    """Raise ValueError when the server would listen beyond this machine without authentication."""
    host = bind_host_from_argv(argv)
    if host is None or is_loopback(host) or allow_remote or auth_enabled:
        return host
    raise ValueError(
        f"refusing to serve patient data on --host {host} without authentication: use --host 127.0.0.1 "
        "(MONAI Label's default is 0.0.0.0), or turn on MONAI Label's authentication "
        "(MONAI_LABEL_AUTH_ENABLE=true, see docs/RELIABILITY.md), or pass --conf allow_remote true "
        "if another layer (a VPN, an authenticating reverse proxy) guards the port")
