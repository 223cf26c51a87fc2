"""Importing the library leaves the host process alone; the entry points set the process defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fasttextdiff.utils.environment import DEFAULTS

PROBE = "import json, os; before = dict(os.environ); {body}; " \
        "print(json.dumps({{k: v for k, v in os.environ.items() if before.get(k) != v}}))"


def _changed(body: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    done = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, env=env,
                          timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_library_changes_no_environment_variable():
    assert _changed("import fasttextdiff, fasttextdiff.commands.main, fasttextdiff.utils.environment") == {}


def test_the_command_line_sets_the_defaults_and_keeps_what_the_user_exported():
    body = "os.environ['HF_HUB_OFFLINE'] = '0'; before = dict(os.environ); import fasttextdiff.commands.main as c; " \
           "c.main(['--help'])"
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    done = subprocess.run([sys.executable, "-c", f"import json, os\ntry:\n    {body}\nexcept SystemExit:\n    pass\n"
                           "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))"],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
    changed = json.loads(done.stdout.strip().splitlines()[-1])
    assert changed == {k: v for k, v in DEFAULTS.items() if k != "HF_HUB_OFFLINE"}
