"""The package graph runs one way: every ``qtx`` import (function-local ones included) goes to
the same package or to one below it in LAYERS, and no library imports the drivers."""

import ast
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "qtx"
# lowest first; a package may import only itself and packages before it
LAYERS = (
    "errors",
    "hugepages",
    "quant",
    "nn",
    "models",
    "data",
    "hf",
    "train",
    "evaluate",
    "methods",
    "run",
)


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, root: pathlib.Path):
    """``(line, imported module)`` for every import of a ``qtx`` module in ``path``."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from qtx import hf`` imports the package qtx.hf
            targets = [target] if target != "qtx" else [f"qtx.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t == "qtx" or t.startswith("qtx."):
                yield node.lineno, t


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def violations(root: pathlib.Path = ROOT) -> list[str]:
    """One line per import against LAYERS or into an unknown package, and per package cycle."""
    rank = {p: i for i, p in enumerate(LAYERS)}
    bad, edges = [], {}
    for path in sorted(root.rglob("*.py")):
        src = _layer(_module_name(path, root))
        if src is None:  # qtx/__init__.py: the version only
            continue
        where = path.relative_to(root.parent)
        if src not in rank:
            bad.append(f"{where}: package qtx.{src} is not in LAYERS")
            continue
        for line, target in _imports(path, root):
            dst = _layer(target)
            if dst is None or dst == src:
                continue
            edges.setdefault(src, set()).add(dst)
            if dst not in rank:
                bad.append(f"{where}:{line} imports {target}: qtx.{dst} is not in LAYERS")
            elif dst == "run":
                bad.append(f"{where}:{line} imports {target}: libraries never import qtx.run")
            elif rank[dst] > rank[src]:
                bad.append(f"{where}:{line} imports {target}: qtx.{dst} is above qtx.{src}")
    bad += [f"package cycle: {' -> '.join(c)}" for c in _cycles(edges)]
    return bad


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of the package graph (one per start package that reaches itself)."""
    found = []
    for start in sorted(edges):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    found.append(trail + [start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    return found


def test_every_import_follows_the_layers():
    assert violations() == []


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert packages | modules <= set(LAYERS)


@pytest.mark.parametrize(
    "where, planted, expected",
    [
        # an upward import hidden in a function
        (
            "quant/spec.py",
            "def _late():\n    from qtx.train.mesh import fetch\n",
            "quant/spec.py:{n} imports qtx.train.mesh: qtx.train is above qtx.quant",
        ),
        # a library importing the drivers
        (
            "methods/__init__.py",
            "from qtx.run import prepare\n",
            "methods/__init__.py:{n} imports qtx.run: libraries never import qtx.run",
        ),
        # ``from qtx import <package>`` and a relative import count too
        ("nn/layers.py", "from qtx import models\n", "qtx.models is above qtx.nn"),
        ("train/steps.py", "from ..evaluate import metrics\n", "qtx.evaluate is above"),
    ],
)
def test_a_planted_upward_import_fails(tmp_path, where, planted, expected):
    copy = tmp_path / "qtx"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    target = copy / where
    text = target.read_text()
    target.write_text(text + "\n" + planted)
    n = len(text.splitlines()) + 2 + planted.startswith("def")  # the planted import's line
    found = violations(copy)
    assert any(expected.format(n=n) in v for v in found), found
    assert any("package cycle" in v for v in found)


def test_a_cycle_is_reported():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
        ["a", "b", "c", "a"],
        ["b", "c", "a", "b"],
        ["c", "a", "b", "c"],
    ]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []
