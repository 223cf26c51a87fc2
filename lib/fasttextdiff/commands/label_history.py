"""`fasttextdiff label-history`: list and restore the kept versions of a person's labels on a server.

The server owns its studies folder (its datastore lock orders every write), so the command asks it
over HTTP (`GET /datastore/label/history`, `POST /datastore/label/restore`) instead of touching the
files: a restore made here is the same as one made from Slicer or the viewer, and is kept in turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def add_label_history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="http://127.0.0.1:8000",
                        help="the MONAI Label server (default: %(default)s)")
    parser.add_argument("--image", required=True, help="the image id in the server's datastore")
    parser.add_argument("--tag", help="one label tag (default: every tag with kept versions; 'final' for --restore)")
    parser.add_argument("--restore", metavar="VERSION", help="make this kept version the current label again")
    parser.add_argument("--token", help="an access token, when the server has authentication on")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")


def _call(args, method: str, path: str, query: dict[str, Any]) -> Any:
    url = args.server.rstrip("/") + path + "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310 - the user's own server URL
            return json.loads(answer.read().decode("utf-8") or "null")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read().decode("utf-8")).get("detail")
        except (ValueError, AttributeError):
            detail = exc.reason
        raise SystemExit(f"error: the server answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SystemExit(f"error: cannot reach the server at {args.server} ({getattr(exc, 'reason', exc)}); "
                         "start it with `make serve`, or give --server URL") from None


def run_label_history(args) -> int:
    if args.restore:
        result = _call(args, "POST", "/datastore/label/restore",
                       {"image": args.image, "tag": args.tag or "final", "version": args.restore})
        print(json.dumps(result, indent=2) if args.json else
              f"restored label {result['tag']} of {result['image']} from version {result['restored']} "
              "(the label it replaced is kept in the history)")
        return 0
    result = _call(args, "GET", "/datastore/label/history", {"image": args.image, "tag": args.tag})
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    versions = result.get("versions", {})
    if not any(versions.values()):
        print(f"no kept versions of {args.image}'s labels" + (f" with tag {args.tag}" if args.tag else ""))
        return 0
    out = sys.stdout
    for tag, kept in versions.items():
        for v in kept:
            info = v.get("info") or {}
            print(f"{tag:10s} {v['version']}  {v['reason']:32s} {v.get('replaced_by') or '-':12s} "
                  f"saved by {info.get('user') or info.get('source') or '-'}  {v['bytes']} bytes", file=out)
    print(f"restore one with: fasttextdiff label-history --server {args.server} --image {args.image} "
          "--tag TAG --restore VERSION", file=out)
    return 0
