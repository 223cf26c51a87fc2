"""The library's layers, as docs/ARCHITECTURE.md writes them: no module imports from a layer above its own,
and no two folders import each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "lib" / "fasttextdiff"


def layer_order() -> list[str]:
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- layer order \(checked by tests/library/test_layers.py\): ([\w ]+) -->", doc)
    assert found, "docs/ARCHITECTURE.md has no '<!-- layer order ... -->' line"
    return found.group(1).split()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "fasttextdiff" and len(parts) > 1 else None


def library_imports() -> list[tuple[Path, int, str, str]]:
    """(file, line, the importing module's layer, the imported module) for every import of the library."""
    out = []
    for path in sorted(LIB.rglob("*.py")):
        rel = path.relative_to(LIB.parent).with_suffix("")
        own = _layer(".".join(rel.parts))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}:{node.lineno}: relative import; the library imports absolutely"
                names = [f"{node.module}.{a.name}" if node.module == "fasttextdiff" else node.module
                         for a in node.names] if node.module else []
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(path, node.lineno, own, name) for name in names if _layer(name)]
    return out


def test_every_library_module_belongs_to_a_documented_layer():
    order = layer_order()
    top = {p.name if p.is_dir() else p.stem for p in LIB.iterdir()
           if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.name.startswith("__"))}
    assert top == set(order), f"folders/modules without a layer: {sorted(top - set(order))}; " \
                              f"layers without a folder: {sorted(set(order) - top)}"


def test_no_module_imports_from_a_layer_above_its_own():
    order = layer_order()
    upward = [f"{path.relative_to(REPO)}:{line}: {own} imports {name}"
              for path, line, own, name in library_imports()
              if own in order and _layer(name) in order and order.index(_layer(name)) > order.index(own)]
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule above can fail: a models module importing a command is reported."""
    fake = tmp_path / "fasttextdiff"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("from fasttextdiff.commands.main import main\n")
    monkeypatch.setattr(__import__(__name__), "LIB", fake)
    found = [(own, name) for _, _, own, name in library_imports()]
    assert ("models", "fasttextdiff.commands.main") in found
