"""The README is for users: short, its Python example runs, every command of the CLI is listed, its links resolve.

The example is run as written, in a folder where its paths exist: `runs/model` is the session's tiny model and
`ct.nii.gz` a small synthetic volume, so the README needs no placeholder a reader would have to guess.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_LINES = 260  # the hard limit (the aim is about 250)


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def python_example(text: str) -> str:
    """The README's first ```python block."""
    found = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert found, "README.md has no ```python example"
    return found.group(1)


def test_readme_is_short():
    lines = _readme().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES})"


def test_readme_python_example_runs(tiny_model, tmp_path, monkeypatch):
    import nibabel as nib

    code = python_example(_readme())
    assert len(code.strip().splitlines()) <= 5, "the README's example should stay five lines"
    assert "runs/model" in code and "ct.nii.gz" in code  # the paths this test provides
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_model, tmp_path / "runs" / "model")
    volume = np.random.default_rng(0).normal(0, 300, (40, 36, 6)).astype(np.int16)  # x, y, z: 6 slices
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-16.0, -14.0, 30.0)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "ct.nii.gz")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example, on purpose

    result = namespace["result"]
    assert result.mask.shape == result.uncertainty.shape == (6, 36, 40)  # (z, y, x): the input's own grid
    for name in ("mask.nii.gz", "uncertainty.nii.gz"):
        written = nib.load(tmp_path / name)
        assert written.shape == volume.shape and np.allclose(written.affine, affine, atol=1e-4), name
    assert set(np.unique(np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj))) <= {0, 1}
    assert 0.0 <= result.summary["uncertainty_mean"] <= 0.5


def test_readme_lists_every_command():
    import argparse

    from fasttextdiff.commands.main import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    text = _readme()
    missing = [name for name in sub.choices if f"`fasttextdiff {name} " not in text]
    assert not missing, f"commands not in the README's table: {missing}"


@pytest.mark.parametrize("doc", ["README.md", "bench/README.md"])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8"))
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, doc
    missing = [t for t in local if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to files that do not exist: {missing}"
