"""The package's import structure: every import goes down the floors (``FLOORS``), no module
reaches into another's private names, and the imports form no cycle (lazy imports inside
functions included). A private name is one home's
business; another module that needs it needs a named internal API instead. The fence modules
(``_torch``, ``_dtensor``, ``_fsdp1``, ``_versions``) are private *files* whose names the package
uses on purpose: importing them, and their names, is allowed."""

from __future__ import annotations

import ast
import pathlib

import distclip

ROOT = pathlib.Path(distclip.__file__).parent
FENCES = {"distclip._torch", "distclip._dtensor", "distclip._fsdp1", "distclip._versions"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(ROOT.rglob("*.py"))}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_reaches(modules: dict[str, ast.Module]) -> list[str]:
    """``from distclip.x import _name`` and ``x._name`` where ``x`` is bound to a distclip module."""
    found = []
    for name, tree in modules.items():
        aliases: dict[str, str] = {}  # local name -> distclip module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distclip"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:
                        aliases[alias.asname or alias.name] = target
                    elif _is_private(alias.name) and node.module not in FENCES and node.module != name:
                        found.append(f"{name}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("distclip") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
                target = aliases.get(node.value.id)
                if target is not None and target not in FENCES and target != name:
                    found.append(f"{name}: {node.value.id}.{node.attr} ({target})")
    return found


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        package = name if tree is not None and (ROOT.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if not base.startswith("distclip"):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("distclip")]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, ignoring edges into a package face (``__init__``): importing ``distclip.x.y``
    runs ``distclip/__init__.py`` first by Python's rules, not by the importer's choice."""
    faces = {name for name in graph if (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node] - faces):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


# The floors, lowest first: a module imports only from a lower floor or from its own folder.
FLOORS = [
    {"distclip._torch", "distclip._dtensor", "distclip._fsdp1", "distclip._versions", "distclip.host_reads", "distclip.gc_pause"},
    {"distclip.math"},
    {"distclip.layout"},
    {"distclip.comm"},
    {"distclip.clip"},
    {"distclip.observe", "distclip.policies"},
    {"distclip.guard"},
    {"distclip"},
    {"distclip.integrations", "distclip.verify"},
]


def unit_of(module: str) -> str:
    """The folder a module sits in under ``distclip`` (``distclip.layout.plan`` -> ``distclip.layout``),
    or the module itself at the root."""
    parts = module.split(".")
    return ".".join(parts[:2])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    floor = {unit: level for level, units in enumerate(FLOORS) for unit in units}
    found = []
    for module, targets in graph.items():
        here = unit_of(module)
        for target in targets:
            there = unit_of(target)
            if there != here and floor.get(there, len(FLOORS)) >= floor.get(here, len(FLOORS)):
                found.append(f"{module} -> {target}")
    return sorted(found)


def test_imports_only_go_down():
    found = upward_imports(import_graph(_modules()))
    assert not found, "imports from the same or a higher floor (see FLOORS):\n" + "\n".join(found)


def test_every_module_has_a_floor():
    units = {unit_of(name) for name in _modules()}
    floored = set().union(*FLOORS)
    assert units <= floored, f"modules on no floor: {sorted(units - floored)}"


def test_no_private_reaches_across_modules():
    found = private_reaches(_modules())
    assert not found, "private names used outside their module (give them a named internal API):\n" + "\n".join(found)


def test_no_import_cycles():
    found = cycles(import_graph(_modules()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checks_find_a_reach_and_a_cycle():
    # the two tests above cannot pass by finding nothing
    planted = {
        "distclip.a": ast.parse("from distclip.b import _secret\nfrom distclip import b\nb._other()\n"),
        "distclip.b": ast.parse("import distclip.a as a\n"),
    }
    assert len(private_reaches(planted)) == 2
    assert cycles({"distclip.a": {"distclip.b"}, "distclip.b": {"distclip.a"}})
    assert cycles(import_graph(planted))
    assert upward_imports({"distclip.math.partials": {"distclip.layout.discovery"}, "distclip.layout.plan": {"distclip.math.partials"}}) == [
        "distclip.math.partials -> distclip.layout.discovery"]
