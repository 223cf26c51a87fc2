"""`fasttextdiff viewer`: bad arguments are one-line errors with exit code 2, before anything
heavy starts; the viewer's system requirements check says what is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fasttextdiff.commands.main import main
from fasttextdiff.viewer import system

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--server", "ftp://host:1"], "not a valid server URL"),
        (["--host", "0.0.0.0"], "--allow-remote"),
        (["--port", "70000"], "--port must be"),
        (["--open", "/no/such/volume.nii.gz"], "no such file"),
        (["--timeout", "0"], "--timeout must be"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    assert main(["viewer", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_viewer_help_lists_its_options():
    out = subprocess.run([sys.executable, "-m", "fasttextdiff.commands.main", "viewer", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for option in ("--server", "--host", "--port", "--open", "--allow-remote"):
        assert option in out.stdout
    assert "127.0.0.1" in out.stdout


def test_system_check_reports_what_is_missing(monkeypatch, capsys):
    monkeypatch.setenv(system.CHROMIUM_ENV, "/no/such/chromium")
    assert system.find_chromium() is None
    assert system.main([]) == 2
    err = capsys.readouterr().err
    assert "Chromium" in err and "apt-get install" in err and "chromium" in err


def test_offscreen_rendering_prefers_egl_and_keeps_a_user_choice(monkeypatch):
    monkeypatch.delenv(system.OPENGL_WINDOW_ENV, raising=False)
    chosen = system.configure_offscreen_rendering()
    assert chosen in ("vtkEGLRenderWindow", "vtkOSOpenGLRenderWindow")
    if system.has_egl():
        assert chosen == "vtkEGLRenderWindow"
    monkeypatch.setenv(system.OPENGL_WINDOW_ENV, "vtkOSOpenGLRenderWindow")
    assert system.configure_offscreen_rendering() == "vtkOSOpenGLRenderWindow"
