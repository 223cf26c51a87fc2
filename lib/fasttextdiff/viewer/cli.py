"""`fasttextdiff viewer`: start the web annotation viewer for a FastTextDiff server."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from fasttextdiff.utils.errors import FastTextDiffError

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_PORT = 8080


def add_viewer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER, metavar="URL",
                   help=f"the FastTextDiff MONAI Label server (default {DEFAULT_SERVER})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the viewer listens on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port of the viewer (default {DEFAULT_PORT}; 0 = any free)")
    p.add_argument("--open", dest="open_path", metavar="FILE",
                   help="a local image to open at start (NIfTI, NRRD, PNG, ...)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the server per request (default 300)")
    p.add_argument("--user", help="log in as USER when the server has MONAI Label authentication on (password from "
                                  "$FASTTEXTDIFF_PASSWORD, else asked; or give a bearer token in $FASTTEXTDIFF_TOKEN)")
    p.add_argument("--allow-remote", action="store_true",
                   help="listen on a non-loopback --host "
                        "(the viewer has no login: only behind your own access control)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_viewer(args) -> int:
    from ReportSegmentLib import ReportSegmentError
    from ReportSegmentLib.httputil import normalize_server_url

    try:
        server_url = normalize_server_url(args.server)
    except ReportSegmentError as exc:
        raise FastTextDiffError(str(exc)) from None
    if not _is_loopback(args.host) and not args.allow_remote:
        raise FastTextDiffError(f"--host {args.host} would expose the viewer (it has no login) beyond this machine; "
                                "use 127.0.0.1, or add --allow-remote behind your own access control")
    if not 0 <= args.port <= 65535:
        raise FastTextDiffError(f"--port must be 0..65535, not {args.port}")
    if args.open_path and not Path(args.open_path).is_file():
        raise FastTextDiffError(f"--open: no such file {args.open_path}")
    if args.timeout <= 0:
        raise FastTextDiffError("--timeout must be a positive number of seconds")

    import logging

    for noisy in ("trame_client", "trame_server", "wslink", "aiohttp"):  # per-widget INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from fasttextdiff.viewer.system import configure_offscreen_rendering

    configure_offscreen_rendering()
    # trame reads its own options from sys.argv unless TRAME_ARGS is set: ours are not for it
    os.environ["TRAME_ARGS"] = "--server"
    # local files come over the websocket: allow volumes up to 1 GiB
    os.environ.setdefault("TRAME_WS_MAX_MSG_SIZE", str(1 << 30))

    credentials = {"token": os.environ.get("FASTTEXTDIFF_TOKEN") or None}
    if args.user:
        import getpass

        password = (os.environ.get("FASTTEXTDIFF_PASSWORD")
                    or getpass.getpass(f"password of {args.user} on {server_url}: "))
        credentials.update(username=args.user, password=password)

    from fasttextdiff.viewer.app import AnnotationViewer

    viewer = AnnotationViewer(server_url, timeout=args.timeout, open_path=args.open_path, credentials=credentials)
    print(f"FastTextDiff viewer for {server_url}: http://{args.host}:{args.port}/", flush=True)
    viewer.start(host=args.host, port=args.port)
    return 0
