"""What the web viewer and its browser tests need from the operating system: off-screen OpenGL for
VTK (EGL with Mesa; OSMesa as the fallback) and a Chromium for Playwright.

`python -m fasttextdiff.viewer.system --install` (run by `make setup`) checks both and, when run as
root on Debian/Ubuntu, installs what is missing with apt-get; otherwise it says what to install.
Playwright's own browser download is not used (it needs the internet at test time); the tests
launch this system Chromium.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys

#: Debian/Ubuntu packages: EGL with Mesa's software rasteriser, and the browser.
EGL_PACKAGES = ("libegl1", "libegl-mesa0", "libgl1-mesa-dri", "libgbm1")
CHROMIUM_PACKAGES = ("chromium",)
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Environment variable naming a Chromium/Chrome executable to use instead of searching PATH.
CHROMIUM_ENV = "FASTTEXTDIFF_CHROMIUM"
OPENGL_WINDOW_ENV = "VTK_DEFAULT_OPENGL_WINDOW"


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable to drive, or None."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _loads(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def has_egl() -> bool:
    """True when an EGL library with a Mesa (or other vendor) driver can be loaded."""
    return _loads("libEGL.so.1", ctypes.util.find_library("EGL") or "libEGL.so") and _loads(
        "libEGL_mesa.so.0", "libEGL_nvidia.so.0"
    )


def has_osmesa() -> bool:
    return _loads("libOSMesa.so.8", "libOSMesa.so.6", ctypes.util.find_library("OSMesa") or "libOSMesa.so")


def configure_offscreen_rendering() -> str:
    """Pick VTK's off-screen render window before VTK is imported (EGL, else OSMesa); returns the
    window class chosen. A value the user set is kept."""
    if os.environ.get(OPENGL_WINDOW_ENV):
        return os.environ[OPENGL_WINDOW_ENV]
    choice = "vtkEGLRenderWindow" if has_egl() or not has_osmesa() else "vtkOSOpenGLRenderWindow"
    os.environ[OPENGL_WINDOW_ENV] = choice
    return choice


def missing() -> dict[str, tuple[str, ...]]:
    """What is missing, as {what: Debian packages}."""
    needs: dict[str, tuple[str, ...]] = {}
    if not (has_egl() or has_osmesa()):
        needs["off-screen OpenGL (EGL/Mesa) for VTK"] = EGL_PACKAGES
    if find_chromium() is None:
        needs["Chromium for the browser tests"] = CHROMIUM_PACKAGES
    return needs


def _can_apt() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def install(needs: dict[str, tuple[str, ...]]) -> None:
    packages = sorted({p for group in needs.values() for p in group})
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="install what is missing with apt-get when root")
    args = parser.parse_args(argv)
    needs = missing()
    if needs and args.install and _can_apt():
        install(needs)
        needs = missing()
    if not needs:
        print(f"viewer system requirements: ok (Chromium {find_chromium()}, "
              f"{'EGL' if has_egl() else 'OSMesa'} off-screen rendering)")
        return 0
    packages = " ".join(sorted({p for group in needs.values() for p in group}))
    print("error: the web viewer and its browser tests need " + "; ".join(needs) + ".\n"
          f"  Debian/Ubuntu: sudo apt-get install {packages}\n"
          f"  (or point {CHROMIUM_ENV} at a Chromium/Chrome executable)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
