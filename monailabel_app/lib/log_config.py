"""MONAI Label's logging config for `monailabel start_server`, written where the caller says.

Without `--log_config FILE`, MONAI Label 0.8.5's `start_server` copies its default `logging.json` into
`tempfile.NamedTemporaryFile(suffix=".json").name` on every start (with the log folder filled in) and
never removes it: one `tmp*.json` left in the temp folder per start. This writes the same config (the
same substitutions: `<app>/logs/app.log`) to a file of ours, to pass as `--log_config`:

    python monailabel_app/lib/log_config.py OUT.json [APP_DIR]

(`make serve` does this; the test fixtures call `write_log_config`.) Only the standard library and
MONAI Label's package data are used, so it runs before the app is loaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[1]


def default_config_text() -> str:
    """MONAI Label's own default logging config (monailabel/logging.json), as shipped."""
    import importlib.util

    spec = importlib.util.find_spec("monailabel")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("MONAI Label is not installed in this interpreter")
    return (Path(list(spec.submodule_search_locations)[0]) / "logging.json").read_text(encoding="utf-8")


def write_log_config(out: str | Path, app_dir: str | Path = APP_DIR, log_file: str = "app.log") -> Path:
    """Write MONAI Label's default logging config for `app_dir` to `out` (replaced as one step)."""
    log_dir = os.path.join(os.path.realpath(app_dir), "logs")
    os.makedirs(log_dir, exist_ok=True)
    text = default_config_text()
    text = text.replace("${LOGDIR}", log_dir.replace("\\", r"\\"))
    text = text.replace("${LOGFILE}", os.path.join(log_dir, log_file).replace("\\", r"\\"))
    json.loads(text)  # still a valid config
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python monailabel_app/lib/log_config.py OUT.json [APP_DIR]")
    print(write_log_config(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else APP_DIR))
