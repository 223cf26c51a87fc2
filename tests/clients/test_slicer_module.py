"""The Slicer module without Slicer: every file compiles, imports stay within what Slicer ships,
the UI file matches what the widget uses, the CMake lists match the files, and the slicer-free
ReportSegmentLib (report text, colours, labels, multipart) behaves. Fast, no server."""

from __future__ import annotations

import ast
import json
import os
import py_compile
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = ROOT / "slicer_module"
MODULE = EXTENSION / "ReportSegment"
LIB = MODULE / "ReportSegmentLib"
SCENE = MODULE / "ReportSegmentScene"
sys.path.insert(0, str(MODULE))

from ReportSegmentLib import (  # noqa: E402
    MAX_REPORT_BYTES,
    ReportSegmentError,
    distinct_colors,
    export_values,
    image_id_from_name,
    label_colors,
    label_info,
    normalize_report,
    progress_from_status,
    read_report_file,
    segments_for_labels,
    summarize_report,
    validate_report,
)
from ReportSegmentLib.colors import color_distance  # noqa: E402
from ReportSegmentLib.httputil import (  # noqa: E402
    decode_multipart,
    encode_multipart,
    filename_from_disposition,
    normalize_server_url,
    server_reason,
)

SLICER_MODULES = {"slicer", "vtk", "qt", "ctk", "SampleData", "SegmentEditorEffects", "SegmentStatistics"}
FORBIDDEN_IN_LIB = {"slicer", "vtk", "qt", "ctk", "numpy", "requests", "SimpleITK", "sitkUtils"}


def _py_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


# ------------------------------------------------------------------ files and imports
def test_every_module_file_compiles(tmp_path):
    files = _py_files(EXTENSION)
    assert len(files) >= 9, files
    for path in files:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


def test_module_files_parse_as_python_3_9():
    """Slicer 5.x bundles Python 3.9: no syntax newer than that anywhere in the module."""
    for path in _py_files(EXTENSION):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_slicer_files_import_only_slicer_stdlib_and_our_lib():
    slicer_files = [p for p in _py_files(EXTENSION) if LIB not in p.parents]
    assert sorted(str(p.relative_to(EXTENSION)) for p in slicer_files) == [
        "ReportSegment/ReportSegment.py",
        "ReportSegment/ReportSegmentScene/__init__.py",
        "ReportSegment/ReportSegmentScene/logic.py",
        "ReportSegment/ReportSegmentScene/nodes.py",
        "run_slicer_tests.py",
    ]
    assert {"slicer", "qt", "vtk", "ReportSegmentLib", "ReportSegmentScene"} <= _imports(MODULE / "ReportSegment.py")
    for path in slicer_files:
        imported = _imports(path)
        assert "slicer" in imported or path.name == "__init__.py", path
        for name in imported:
            allowed = (
                name in sys.stdlib_module_names
                or name in SLICER_MODULES
                or name.startswith("SegmentEditor")
                or name in ("ReportSegmentLib", "ReportSegment", "ReportSegmentScene")
            )
            assert allowed, f"{path.name} imports {name}, which Slicer does not ship"


def test_scene_logic_uses_mrml_and_logic_classes_only():
    """Everything that touches the scene runs without Qt (slicer-core, the web viewer): no qt/ctk
    imports and no use of the Qt application's ``slicer.app``, ``slicer.util``, ``slicer.mrmlScene``
    or ``slicer.modules``."""
    files = _py_files(SCENE)
    assert len(files) == 3
    for path in files:
        assert not _imports(path) & {"qt", "ctk", "SampleData"}, path
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "slicer":
                assert node.attr.startswith("vtk"), f"{path.name} uses slicer.{node.attr}"
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slicer."):
                raise AssertionError(f"{path.name} imports from {node.module}")


def test_lib_imports_only_the_standard_library():
    files = _py_files(LIB)
    assert len(files) >= 7
    for path in files:
        for name in _imports(path):
            assert name not in FORBIDDEN_IN_LIB, f"{path.name} imports {name}"
            assert name in sys.stdlib_module_names or name == "__future__", f"{path.name} imports {name}"


def test_lib_runs_without_site_packages():
    """Import and use the sub-package in an isolated interpreter with no site-packages, the way
    Slicer's bare Python would load it, and check nothing outside the stdlib got loaded."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import ReportSegmentLib as L;"
        "c = L.FastTextDiffClient('127.0.0.1:9');"
        "assert L.validate_report(' a \\r\\n') == 'a';"
        "bad = [m for m in ('slicer','vtk','qt','ctk','numpy','requests') if m in sys.modules];"
        "print('OK', c.url, bad)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(MODULE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK http://127.0.0.1:9 []"


# ------------------------------------------------------------------ UI, CMake, icon
def test_ui_file_is_valid_and_has_every_widget_the_widget_uses():
    tree = ET.parse(MODULE / "Resources" / "UI" / "ReportSegment.ui")
    names = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "ReportSegment.py").read_text(encoding="utf-8")))
    assert used, "the widget uses no UI elements?"
    missing = used - set(names)
    assert not missing, f"ReportSegment.py uses widgets absent from the .ui file: {missing}"
    expected = {
        "serverUrlLineEdit": "QLineEdit",
        "connectButton": "QPushButton",
        "serverInfoLabel": "QLabel",
        "volumeSelector": "qMRMLNodeComboBox",
        "reportTextEdit": "QPlainTextEdit",
        "loadReportButton": "QPushButton",
        "segmentButton": "QPushButton",
        "nextSampleButton": "QPushButton",
        "submitLabelButton": "QPushButton",
        "trainButton": "QPushButton",
        "trainProgressBar": "QProgressBar",
        "statusLabel": "QLabel",
    }
    for name, cls in expected.items():
        assert names.get(name) == cls, (name, names.get(name))
    # the volume selector gets the scene from the top-level qMRMLWidget
    connections = [(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"))
                   for c in tree.iter("connection")]
    assert ("ReportSegment", "mrmlSceneChanged(vtkMRMLScene*)", "volumeSelector") in connections


def test_cmake_lists_match_the_files():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "ReportSegment")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", text, flags=re.M))
    on_disk = {str(p.relative_to(MODULE)) for p in _py_files(MODULE)}
    assert on_disk <= listed, f"not in CMakeLists: {on_disk - listed}"
    for item in listed:
        assert (MODULE / item).is_file(), f"CMakeLists names a missing file: {item}"
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest" in text
    top = (EXTENSION / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(ReportSegment)" in top and "find_package(Slicer REQUIRED)" in top


def test_icon_is_a_real_png():
    data = (MODULE / "Resources" / "Icons" / "ReportSegment.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert 16 <= width <= 256 and width == height
    assert zlib.crc32(data[12:29]) & 0xFFFFFFFF == struct.unpack(">I", data[29:33])[0]
    assert b"IEND" in data[-12:]


def test_the_web_viewer_shows_the_module_icon():
    """The viewer's favicon (in the wheel, where the module's Resources are not) is the module's icon."""
    viewer_icon = ROOT / "lib" / "fasttextdiff" / "viewer" / "favicon.png"
    assert viewer_icon.read_bytes() == (MODULE / "Resources" / "Icons" / "ReportSegment.png").read_bytes()


# ------------------------------------------------------------------ installed packages
def test_the_project_install_imports_the_scene_packages_from_the_module_folder(tmp_path):
    """`make setup`'s editable install exposes ReportSegmentLib and ReportSegmentScene as packages: a
    process outside the checkout, with no sys.path change, imports the very files desktop Slicer loads
    from the module folder (the web viewer imports them this way)."""
    code = (
        "import json, ReportSegmentLib, ReportSegmentScene, fasttextdiff.viewer.cli;"
        "print(json.dumps([ReportSegmentLib.__file__, ReportSegmentScene.__file__]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lib_file, scene_file = (Path(p) for p in json.loads(out.stdout.strip().splitlines()[-1]))
    assert lib_file == LIB / "__init__.py" and scene_file == SCENE / "__init__.py", (lib_file, scene_file)


def test_module_declares_the_template_classes():
    tree = ast.parse((MODULE / "ReportSegment.py").read_text(encoding="utf-8"))
    bases = {
        node.name: {getattr(b, "id", None) for b in node.bases} for node in tree.body if isinstance(node, ast.ClassDef)
    }
    assert "ScriptedLoadableModule" in bases["ReportSegment"]
    assert "ScriptedLoadableModuleWidget" in bases["ReportSegmentWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["ReportSegmentLogic"]
    assert "ScriptedLoadableModuleTest" in bases["ReportSegmentTest"]


# ------------------------------------------------------------------ report text
def test_normalize_report():
    raw = "\ufeffBilateral infection,\r\nupper left lung.  \r\n\r\n\r\n\r\nNo effusion.\x00\x07\t\n\n"
    assert normalize_report(raw) == "Bilateral infection,\nupper left lung.\n\nNo effusion."
    assert normalize_report(None) == ""
    assert normalize_report("e\u0301") == "\u00e9"  # NFC
    with pytest.raises(ReportSegmentError):
        normalize_report(b"bytes")  # type: ignore[arg-type]


def test_validate_report_limit_is_a_sentence():
    assert len(validate_report("a" * MAX_REPORT_BYTES)) == MAX_REPORT_BYTES
    with pytest.raises(ReportSegmentError) as err:
        validate_report("a" * (MAX_REPORT_BYTES + 1))
    assert "at most" in str(err.value) and str(err.value).endswith(".")
    with pytest.raises(ReportSegmentError, match="bytes"):  # the limit counts UTF-8 bytes, as the server does
        validate_report("\u00e9" * (MAX_REPORT_BYTES // 2 + 1))
    assert validate_report("ab", max_bytes=2) == "ab"


@pytest.mark.parametrize(
    "encoding,prefix",
    [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("utf-16", b""), ("cp1252", b""), ("latin-1", b"")],
)
def test_read_report_file_encodings(tmp_path, encoding, prefix):
    text = "Opacité du lobe supérieur droit \u2013 no effusion." if encoding != "latin-1" else "Opacité, lobe droit."
    path = tmp_path / "report.txt"
    path.write_bytes(prefix + text.replace("\n", "\r\n").encode(encoding))
    assert read_report_file(str(path)) == text


def test_read_report_file_refuses_binary_missing_and_huge(tmp_path):
    binary = tmp_path / "scan.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ReportSegmentError, match="not a text file"):
        read_report_file(str(binary))
    with pytest.raises(ReportSegmentError, match="Cannot read"):
        read_report_file(str(tmp_path / "missing.txt"))
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"a" * (4 * MAX_REPORT_BYTES + 1))
    with pytest.raises(ReportSegmentError, match="at most"):
        read_report_file(str(huge))


def test_image_id_from_name_and_summary():
    assert image_id_from_name("/data/CT chest #1.nii.gz") == "CT_chest_1"
    assert image_id_from_name("case_007.nrrd") == "case_007"
    assert image_id_from_name("...") == "image"
    assert summarize_report("") == "(no report)"
    line = summarize_report("word " * 40, width=20)
    assert len(line) == 20 and line.endswith("\u2026")


# ------------------------------------------------------------------ colours and labels
@pytest.mark.parametrize("count", [1, 2, 5, 12, 13, 30, 100])
def test_distinct_colors_are_distinct_and_valid(count):
    colors = distinct_colors(count)
    assert len(colors) == count == len(set(colors))
    assert all(0.0 <= c <= 1.0 for rgb in colors for c in rgb)
    assert distinct_colors(count) == colors  # deterministic
    if count <= 12:
        closest = min(color_distance(a, b) for i, a in enumerate(colors) for b in colors[i + 1 :]) if count > 1 else 1
        assert closest > 0.25


def test_label_colors_skip_background_and_duplicates():
    colors = label_colors(["background", "ground-glass opacity", "consolidation", "ground-glass opacity"])
    assert list(colors) == ["ground-glass opacity", "consolidation"]
    assert colors["ground-glass opacity"] != colors["consolidation"]


def test_segments_and_export_values_keep_server_label_values():
    specs = segments_for_labels({"background": 0, "lesion, right upper lobe": 1, "effusion": 2})
    assert [(s.name, s.value) for s in specs] == [("lesion, right upper lobe", 1), ("effusion", 2)]
    assert specs[0].color != specs[1].color
    # user deleted "effusion" and painted a new segment: it gets a value the server does not use
    exported = export_values(["new finding", "lesion, right upper lobe"],
                             {"lesion, right upper lobe": 1, "effusion": 2})
    assert [(s.name, s.value) for s in exported] == [("lesion, right upper lobe", 1), ("new finding", 3)]
    info = label_info(exported)
    assert info[0]["name"] == "lesion, right upper lobe" and info[0]["idx"] == 1
    json.dumps(info)  # travels as JSON


# ------------------------------------------------------------------ HTTP helpers
def test_multipart_round_trip_keeps_binary_bytes(tmp_path):
    payload = bytes(range(256)) * 3 + b"\r\n--not-a-boundary\r\n\r\n"
    path = tmp_path / "label.nii.gz"
    path.write_bytes(payload)
    body, content_type = encode_multipart(
        {"params": json.dumps({"text": "Opacité\nline two"})}, {"label": str(path), "extra": ("x.txt", b"abc")}
    )
    parts = decode_multipart(body, content_type)
    assert [p.name for p in parts] == ["params", "label", "extra"]
    assert json.loads(parts[0].data.decode("utf-8")) == {"text": "Opacité\nline two"}
    assert parts[1].filename == "label.nii.gz" and parts[1].data == payload
    assert parts[2].data == b"abc"


def test_decode_multipart_reads_requests_toolbelt_output():
    """The infer answer is built by requests_toolbelt's MultipartEncoder on the server."""
    toolbelt = pytest.importorskip("requests_toolbelt")
    encoder = toolbelt.MultipartEncoder(
        fields={
            "params": (None, json.dumps({"labels": {"lesion": 1}}), "application/json"),
            "image": ("seg.nrrd", b"\x00\x01NRRD\r\n\r\nbody", "application/octet-stream"),
        }
    )
    parts = decode_multipart(encoder.to_string(), encoder.content_type)
    by_name = {p.name: p for p in parts}
    assert json.loads(by_name["params"].data) == {"labels": {"lesion": 1}}
    assert by_name["image"].filename == "seg.nrrd" and by_name["image"].data == b"\x00\x01NRRD\r\n\r\nbody"


@pytest.mark.parametrize(
    "url,expected",
    [
        ("127.0.0.1:8000", "http://127.0.0.1:8000"),
        (" http://localhost:8000/ ", "http://localhost:8000"),
        ("https://label.example.org/monai/", "https://label.example.org/monai"),
    ],
)
def test_normalize_server_url(url, expected):
    assert normalize_server_url(url) == expected


@pytest.mark.parametrize("url", ["", "ftp://host", "http://", "http://host:99999", "http://a b", "http://h/?x=1"])
def test_bad_server_urls_are_refused_with_a_sentence(url):
    with pytest.raises(ReportSegmentError) as err:
        normalize_server_url(url)
    message = str(err.value)
    assert message.endswith(".") and "\n" not in message


def test_server_reason_reads_fastapi_details():
    assert server_reason(b'{"detail": "Image NOT Found"}') == "Image NOT Found"
    validation = json.dumps({"detail": [{"loc": ["query", "image"], "msg": "field required"}]}).encode()
    assert server_reason(validation) == "image: field required"
    assert server_reason(b"<html><body><h1>502 Bad Gateway</h1></body></html>") == "502 Bad Gateway"
    assert filename_from_disposition("attachment; filename=\"../../etc/x.nii.gz\"", "f") == "x.nii.gz"
    assert filename_from_disposition("attachment; filename*=utf-8''%C3%A9t%C3%A9.nrrd", "f") == "_t_.nrrd"
    assert filename_from_disposition(None, "case 1.nrrd") == "case 1.nrrd"


def test_progress_from_status():
    none = progress_from_status(None, None)
    assert none.state == "NONE" and not none.running and none.percent == 0
    running = progress_from_status({"status": "RUNNING"}, {"epoch": 3, "total_epochs": 10, "best_metric": 0.5})
    assert running.running and running.percent == 30 and "epoch 3 of 10" in running.message
    done = progress_from_status({"status": "DONE"}, {"best_metric": 0.81})
    assert not done.running and done.percent == 100 and "0.810" in done.message
    failed = progress_from_status({"status": "ERROR", "details": ["...", "RuntimeError: no labeled images"]}, {})
    assert failed.state == "ERROR" and "no labeled images" in failed.message and failed.message.endswith(".")
