"""The wheel, outside the checkout: built from the sources alone (pyproject.toml, README.md, lib/,
slicer_module/) and installed into a fresh virtual environment, it imports (`import fasttextdiff` leaves
os.environ as it was) and runs `fasttextdiff viewer` from a folder that is not the checkout. The Slicer
module's client and scene logic (`ReportSegmentLib`, `ReportSegmentScene`) come with it as installed
packages, and the viewer uses those: nothing reaches back into the repository.

The fresh environment has no pip and no dependencies of its own: this project's pip installs the wheel
into it (`pip --python`), and a .pth file lists the project environment's site-packages after its own,
so the runtime dependencies (trame, slicer-core, torch, ...) are visible while this project is not (the
project environment's editable install is a .pth hook there, which a listed folder does not run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "lib", "slicer_module")
PACKAGES = ("fasttextdiff", "ReportSegmentLib", "ReportSegmentScene")


def _run(cmd, cwd, timeout=300, env=None, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _clean_env() -> dict[str, str]:
    """The caller's environment less anything that would point Python back at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin folder, the wheel, the folder the commands run in)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=skip)
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src],
         cwd=root)
    (wheel,) = (root / "dist").glob("fasttextdiff-*.whl")

    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=root)
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         cwd=root)
    own_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=root, env=_clean_env()).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (own_site / "zz_project_dependencies.pth").write_text("".join(f"{d}\n" for d in deps), encoding="utf-8")

    outside = root / "elsewhere"
    outside.mkdir()
    return env_dir / "bin", wheel, outside


def test_the_wheel_holds_the_library_the_viewer_and_the_shared_scene_packages(installed):
    _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("fasttextdiff/__init__.py", "fasttextdiff/viewer/cli.py", "fasttextdiff/viewer/favicon.png",
                     "ReportSegmentLib/__init__.py", "ReportSegmentLib/client.py",
                     "ReportSegmentScene/__init__.py", "ReportSegmentScene/logic.py", "ReportSegmentScene/nodes.py"):
        assert required in names, f"{required} is not in {wheel.name}"
    # the Slicer module itself (its widget, UI and CMake files) is Slicer's, not the wheel's
    assert not [n for n in names if n.startswith(("ReportSegment.py", "Resources/", "slicer_module/"))]


def test_import_outside_the_checkout_uses_the_installed_packages_and_leaves_the_environment(installed):
    bin_dir, _, outside = installed
    code = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import fasttextdiff\n"
        "unchanged = dict(os.environ) == before\n"
        "import ReportSegmentLib, ReportSegmentScene\n"
        "import fasttextdiff.viewer.session\n"
        "from fasttextdiff.viewer import FAVICON\n"
        "print(json.dumps({'unchanged': unchanged, 'favicon': FAVICON.is_file(), 'prefix': sys.prefix,\n"
        "                  'files': {m: sys.modules[m].__file__ for m in %r}}))\n" % (PACKAGES,)
    )
    out = _run([bin_dir / "python", "-c", code], cwd=outside, env=_clean_env())
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["unchanged"], "import fasttextdiff changed os.environ"
    assert found["favicon"], "the viewer's favicon is not in the installed package"
    for module, path in found["files"].items():
        assert Path(path).is_relative_to(found["prefix"]), f"{module} comes from {path}, not the fresh environment"
        assert not Path(path).is_relative_to(REPO), f"{module} comes from the checkout: {path}"


def test_fasttextdiff_viewer_runs_from_the_installed_command(installed):
    bin_dir, _, outside = installed
    helped = _run([bin_dir / "fasttextdiff", "viewer", "--help"], cwd=outside, env=_clean_env())
    assert "--server" in helped.stdout and "--allow-remote" in helped.stdout, helped.stdout
    # a bad server URL is refused by ReportSegmentLib's check, reached through the installed package
    refused = _run([bin_dir / "fasttextdiff", "viewer", "--server", "ftp://127.0.0.1:8000"],
                   cwd=outside, env=_clean_env(), check=False)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "http:// or https://" in refused.stderr, refused.stderr
