"""The layer rule of docs/design.md ("Layers"), enforced: every module under catfast/ is read with ``ast``
(imports inside functions included) and may import only the catfast packages its layer allows, and only
``integrations/`` may import diffusers, peft or transformers. The table here and the one in docs/design.md
are the same table (checked below), so the rule cannot drift from its description."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FOUNDATION = {"errors", "folders", "shipped", "rows", "env", "_ext", "targets", "backends"}
LOWER = FOUNDATION | {"ops", "nn", "adapters", "integrations"}

# package (a subpackage or a top-level module of catfast) -> the catfast packages it may import.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "targets": set(),
    "rows": set(),
    "_ext": {"_C"},
    "folders": {"errors"},
    "shipped": {"errors"},  # where the shipped demo files lie; integrations resolves `--base demo` with it
    "env": {"_ext", "backends"},
    "backends": {"errors", "_ext"},  # its probes (CUDA and Triton ones its own) ask what runs; env prints its table
    "reference": {"rows"},
    "kernels": {"errors"},
    "ops": FOUNDATION | {"reference", "kernels"},
    "nn": FOUNDATION | {"ops"},
    "adapters": FOUNDATION | {"ops"},
    "integrations": FOUNDATION | {"ops", "nn", "adapters"},
    "eval": LOWER,
    "export": FOUNDATION | {"adapters", "integrations"},
    "train": LOWER | {"eval"},
    "serve": LOWER | {"eval", "demo"},
    "demo": FOUNDATION | {"adapters", "integrations", "eval", "train"},
    "e4t": FOUNDATION | {"adapters", "integrations", "eval", "train", "demo"},
    "bench": LOWER | {"reference", "kernels", "eval", "export", "train", "serve", "demo", "e4t"},
    "cli": {"*"},
    "testing": {"*"},  # tests' tolerances and fixtures; no library module imports it (below)
    "__init__": {"*"},  # the public API: every name is loaded lazily from its module (test_install.py)
    "__main__": {"cli"},
}

# Only integrations/ wraps these libraries (and testing.py, the tests' fixture builders, may build with them).
WRAPPED = {"diffusers", "peft", "transformers"}


def _imports(path: Path, root: Path):
    """(line, imported dotted name) for every import in the module, including those inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = path.relative_to(root).with_suffix("").parts[: -node.level]
                yield node.lineno, ".".join(base + ((node.module,) if node.module else ()))
            elif node.module:
                yield node.lineno, node.module
                if node.module == "catfast":  # from catfast import X, where X is a package or module
                    for alias in node.names:
                        if (root / "catfast" / alias.name).is_dir() or (root / "catfast" / f"{alias.name}.py").exists():
                            yield node.lineno, f"catfast.{alias.name}"


def _allowed(package: str, target: str) -> bool:
    """Whether ``package`` may import ``catfast.<target>`` (target: dotted, without the catfast prefix)."""
    allowed = ALLOWED[package]
    top = target.split(".")[0]
    return "*" in allowed or top == package or top in allowed


def _violations(root: Path = ROOT) -> list[str]:
    """One line per import that breaks the rule, for the catfast/ package under ``root``."""
    found = []
    for path in sorted((root / "catfast").rglob("*.py")):
        package = path.relative_to(root / "catfast").with_suffix("").parts[0]
        where = path.relative_to(root)
        if package not in ALLOWED:
            found.append(f"{where}: package {package!r} is not in the layer table (tests/test_layers.py)")
            continue
        for line, name in _imports(path, root):
            top = name.split(".")[0]
            if top in WRAPPED and package not in ("integrations", "testing"):
                found.append(f"{where}:{line} imports {name} (only catfast/integrations/ may)")
            if top == "catfast" and name != "catfast":
                target = name.split(".", 1)[1]
                if target.split(".")[0] == "testing" and package != "testing":
                    found.append(f"{where}:{line} imports catfast.testing (tests' helpers; no library module may)")
                elif not _allowed(package, target):
                    allowed = sorted(ALLOWED[package])
                    found.append(f"{where}:{line} imports catfast.{target} ({package} may import {allowed})")
    return found


def test_imports_follow_the_layers():
    assert _violations() == []


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: an upward import and a diffusers import outside integrations/ are both reported."""
    fake = tmp_path / "catfast"
    (fake / "ops").mkdir(parents=True)
    (fake / "ops" / "bad.py").write_text("def f():\n    import diffusers\n    from catfast.train import objective\n")
    (fake / "integrations").mkdir()
    (fake / "integrations" / "ok.py").write_text("import peft\nfrom catfast.nn import row_lora\n")
    (fake / "serve").mkdir()
    (fake / "serve" / "bad.py").write_text("from catfast import testing\n")
    (fake / "testing.py").write_text("")
    found = _violations(tmp_path)
    assert len(found) == 3, found
    assert "ops/bad.py:2 imports diffusers" in found[0]
    assert "ops/bad.py:3 imports catfast.train" in found[1]
    assert "serve/bad.py:1 imports catfast.testing" in found[2]


# Circles of modules (a imports b imports ... a, imports inside functions included) that are known and still to be
# broken; each entry is one circle's modules. Any other circle fails, and so does an entry whose circle is gone
# (delete it with the change that breaks the circle).
KNOWN_CIRCLES: list[set[str]] = []  # none: every circle of modules fails the test


def _module_graph(root: Path) -> dict[str, set[str]]:
    """module -> the catfast modules it imports (dotted; a package is its __init__), for catfast/ under ``root``."""
    files = {}
    for path in sorted((root / "catfast").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def nearest(name: str) -> str | None:  # the module a dotted name lies in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {nearest(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = path.relative_to(root).with_suffix("").parts[: -node.level] if node.level else ()
                base = ".".join(base + ((node.module,) if node.module else ()))
                targets |= {nearest(f"{base}.{alias.name}") for alias in node.names}
        graph[module] = {t for t in targets if t and t != module and t != "catfast"}
    return graph


def _circles(root: Path = ROOT) -> list[set[str]]:
    """The circles of modules: each set of two or more modules that all reach each other through imports."""
    graph = _module_graph(root)
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()] - seen:
                seen.add(t)
                todo.append(t)
        reach[start] = seen
    circles = []
    for module in sorted(graph):
        circle = {m for m in reach[module] if module in reach[m]}
        if len(circle) > 1 and circle not in circles:
            circles.append(circle)
    return circles


def test_no_circles_of_modules():
    found = _circles()
    new = [sorted(c) for c in found if c not in KNOWN_CIRCLES]
    gone = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert not new, f"modules that import each other in a circle: {new}"
    assert not gone, f"these circles are gone (or changed): remove them from KNOWN_CIRCLES: {gone}"


def test_the_circle_check_catches_a_circle(tmp_path):
    """The checker itself: a lazy import back (ops/b.py -> ops/a.py inside a function) closes a circle."""
    ops = tmp_path / "catfast" / "ops"
    ops.mkdir(parents=True)
    (ops / "a.py").write_text("from catfast.ops.b import f\n")
    (ops / "b.py").write_text("def f():\n    from catfast.ops import a\n")
    (ops / "c.py").write_text("from catfast.ops import a, b\n")
    assert _circles(tmp_path) == [{"catfast.ops.a", "catfast.ops.b"}]


# Model classes are the families' knowledge (catfast/integrations/families/): code elsewhere asks a family
# (family_of, denoiser_type, pipeline_type) and never names a denoiser or pipeline class. Comments and docstrings
# may (they describe diffusers); code and other strings may not, except here, each with its reason.
CLASS_NAME_ALLOWED: dict[str, str] = {
    # file being edited by another change; move later (the help can read family.pipeline_classes)
    "catfast/cli/train.py": "--base's help names the DiT pipeline classes",
}


def _class_names_in_code(root: Path = ROOT) -> list[str]:
    """``path:line name`` for each model class name (the families' denoiser and pipeline classes) that code
    outside catfast/integrations/families/ holds: a name, an attribute, an import, or a string that is not a
    docstring."""
    from catfast.integrations.families import FAMILIES

    names = {f.denoiser_class for f in FAMILIES.values()} | {p for f in FAMILIES.values() for p in f.pipeline_classes}
    word = re.compile(r"\b(" + "|".join(sorted(names)) + r")\b")
    found = []
    for path in sorted((root / "catfast").rglob("*.py")):
        where = path.relative_to(root).as_posix()
        if where.startswith("catfast/integrations/families/") or where in CLASS_NAME_ALLOWED:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                text = node.id
            elif isinstance(node, ast.Attribute):
                text = node.attr
            elif isinstance(node, ast.alias):
                text = node.name
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            else:
                continue
            for match in word.finditer(text):
                found.append(f"{where}:{getattr(node, 'lineno', '?')} {match.group()}")
    return found


def test_only_the_families_name_model_classes():
    assert _class_names_in_code() == []
    assert all((ROOT / path).is_file() for path in CLASS_NAME_ALLOWED), "remove allow-list entries of gone files"


def test_the_class_name_check_catches_a_name(tmp_path):
    """The checker itself: a class named in code or in a string is reported; in a docstring or comment it is not."""
    (tmp_path / "catfast" / "eval").mkdir(parents=True)
    (tmp_path / "catfast" / "eval" / "bad.py").write_text(
        '"""Like diffusers\' FluxPipeline."""\n'
        "# a UNet2DConditionModel\n"
        "from diffusers import UNet2DConditionModel\n"
        'KIND = "StableDiffusionXLPipeline"\n'
    )
    assert _class_names_in_code(tmp_path) == [
        "catfast/eval/bad.py:3 UNet2DConditionModel",
        "catfast/eval/bad.py:4 StableDiffusionXLPipeline",
    ]


def _doc_table() -> dict[str, set[str]]:
    """The table between the layers markers of docs/design.md, expanded ("foundation", "everything")."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text.split("<!-- layers:begin -->")[1].split("<!-- layers:end -->")[0]
    table = {}
    for row in block.strip().splitlines()[2:]:
        names_cell, allowed_cell = [c.strip() for c in row.strip().strip("|").split("|")]
        names = re.findall(r"`([\w.]+)`", names_cell)
        if allowed_cell == "everything":
            allowed = {"*"}
        elif allowed_cell == "nothing from catfast":
            allowed = set()
        else:
            allowed = set()
            for word in re.findall(r"`?([\w.]+)`?", allowed_cell.split("(")[0]):
                if word == "foundation":
                    allowed |= FOUNDATION
                elif word not in ("and",):
                    allowed.add(word)
        for name in names:
            table[name] = allowed
    return table


def test_design_doc_has_the_same_table():
    documented = _doc_table()
    expected = {k: v for k, v in ALLOWED.items() if k not in ("__init__", "__main__")}
    assert documented == expected
