"""The package follows the data: a module imports only from modules whose notebooks come before its own."""
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def notebook_modules() -> dict[str, int]:
    "Module name -> position of its notebook in reading order."
    order = {}
    for position, notebook in enumerate(sorted((ROOT / "nbs").glob("*.ipynb"))):
        for cell in json.loads(notebook.read_text())["cells"]:
            source = "".join(cell["source"])
            if source.startswith("#| default_exp"):
                order["stereo_kit." + source.split()[2].removesuffix(".__init__")] = position
    return order


def imported_modules(path: Path, package: str) -> set[str]:
    "The stereo_kit modules a generated module imports (relative imports resolved), at any depth of its code."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("stereo_kit"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("stereo_kit")}
    return found


def test_no_module_imports_from_a_later_stage():
    order = notebook_modules()
    assert len(order) > 20
    later = []
    for module, position in order.items():
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists(): path = ROOT / module.replace(".", "/") / "__init__.py"
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for imported in imported_modules(path, package):
            imported = imported if imported in order else imported.rsplit(".", 1)[0]     # `from .x import name`
            if imported in order and order[imported] > position: later.append(f"{module} imports {imported}")
    assert later == []


def test_every_module_has_its_notebook():
    order = notebook_modules()
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in (ROOT / "stereo_kit").rglob("*.py") if p.name != "_modidx.py"}
    assert modules - set(order) - {"stereo_kit", "stereo_kit.train", "stereo_kit.data"} == set()
