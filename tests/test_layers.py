"""The layout holds: imports run one way through the layers of docs/ARCHITECTURE.md (counting
imports inside functions), there is no import cycle, and no module outside fastseed.methods and
the CLI names a method."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastseed"  # kernels/ and data_prep/ are reached through its symlinks


def layer_table(text: str) -> dict[str, int]:
    """module prefix -> layer, from the rows between the layers markers."""
    block = text.split("<!-- layers: read by tests/test_layers.py -->")[1].split("<!-- /layers -->")[0]
    table = {}
    for row in block.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in re.findall(r"`([\w.]+)`", cells[1]):
                table[name] = int(cells[0])
    return table


LAYERS = layer_table((ROOT / "docs" / "ARCHITECTURE.md").read_text())


def layer_of(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def modules() -> dict[str, Path]:
    """Every module of the fastseed package (following its symlinked subpackages)."""
    found = {}
    for folder, _, files in sorted(os.walk(PACKAGE, followlinks=True)):
        for file in sorted(f for f in files if f.endswith(".py")):
            path = Path(folder) / file
            parts = path.relative_to(PACKAGE).with_suffix("").parts
            found[".".join(("fastseed", *parts)).removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastseed modules `name` imports anywhere in its file (an import of a name from a
    package counts as an import of the submodule when there is one of that name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and self-loops."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle_and_reads_the_table():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("fastseed.kernels.check") == 6 and layer_of("fastseed.kernels.seed_loss") == 0
    assert layer_of("fastseed.teachers.official") == layer_of("fastseed.teachers") == 2
    assert {"fastseed.kernels.seed_loss", "fastseed.data_prep.write", "fastseed.teachers.dino"} <= set(modules())


def test_every_module_has_a_layer():
    missing = [m for m in modules() if layer_of(m) is None]
    assert not missing, f"add these to the layers table of docs/ARCHITECTURE.md: {missing}"


def test_imports_never_go_up_a_layer():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph().items() for t in sorted(targets)
              if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    assert cycles(graph()) == []


def method_names() -> set[str]:
    from fastseed.methods import METHODS
    return set(METHODS)


def _names_method(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(n, ast.Constant) and n.value in names for n in ast.walk(node))


def _about_method(node: ast.AST) -> bool:
    return any((isinstance(n, ast.Name) and "method" in n.id) or (isinstance(n, ast.Attribute) and "method" in n.attr)
               for n in ast.walk(node))


@pytest.mark.parametrize("name", [m for m in modules() if not m.startswith(("fastseed.methods", "fastseed.cli"))])
def test_no_module_outside_methods_names_a_method(name):
    """A branch on a method's name (`cfg.method == "moco"`, `method in ("seed", ...)`) or a table
    keyed by them (two or more: "seed" is also the RNG seed's key) belongs in that method's own
    file: adding a method must not touch this module."""
    names, found = method_names(), []
    for node in ast.walk(ast.parse(modules()[name].read_text())):
        if isinstance(node, ast.Compare) and _about_method(node) and _names_method(node, names):
            found.append(f"line {node.lineno}: a comparison with a method name")
        elif (isinstance(node, ast.Dict)
              and sum(isinstance(k, ast.Constant) and k.value in names for k in node.keys) > 1):
            found.append(f"line {node.lineno}: a table keyed by method names")
        elif isinstance(node, ast.Subscript) and _about_method(node.value) and _names_method(node.slice, names):
            found.append(f"line {node.lineno}: a registry looked up by a literal method name")
    assert not found, f"{name}: " + "; ".join(found)


def test_setup_lists_every_package():
    """A wheel (the GPU machine installs one) holds only the packages setup.py names: a new
    subpackage left out of the list imports here (editable install) and fails there."""
    listed = set(re.search(r"packages=\[([^\]]*)\]", (ROOT / "setup.py").read_text())[1].replace('"', "").replace(
        " ", "").split(","))
    packages = {m for m, path in modules().items() if path.name == "__init__.py"}
    assert packages == listed - {""}, (packages ^ listed)


@pytest.mark.parametrize("name", [m for m in modules() if not m.startswith(("fastseed.methods", "fastseed.cli"))])
def test_only_the_cli_and_the_methods_look_a_method_up_by_name(name):
    """A run resolves its method once (`methods.method_of` in `train.prepare`) and passes the class
    on; the step and the modules it calls never look one up, nor probe a method with hasattr."""
    found = []
    for node in ast.walk(ast.parse(modules()[name].read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            called = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if called in ("method_class", "METHODS"):
                found.append(f"line {node.lineno}: {called}(...)")
            probed = node.args[0] if node.args else None
            if called == "hasattr" and isinstance(probed, ast.Name) and ("method" in probed.id or probed.id == "cls"):
                found.append(f"line {node.lineno}: hasattr on a method")
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "METHODS":
            found.append(f"line {node.lineno}: METHODS[...]")
    assert not found, f"{name}: " + "; ".join(found)


def test_the_step_uses_the_runs_method():
    """No lookup in the step: `train_step` takes the loss targets from `run.method`."""
    import inspect

    from fastseed import train
    source = inspect.getsource(train.train_step)
    assert "run.method.loss_targets" in source and "method_of" not in source
