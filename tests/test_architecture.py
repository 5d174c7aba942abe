"""The shape of the code, checked from the source: imports flow one way along the loop's walk.

The import graph of `app/` and `worker/` is built from the source text (every
`import` and `from ... import`, at module level or inside functions), so these
rules hold for lazy imports too:

- no import cycles;
- no import of another module's private name (`from m import _x`, `m._x`);
- the web process (everything `app.main` reaches) imports neither torch nor
  transformers/peft nor the `worker` package;
- the kernel imports no stage, and a stage imports only the kernel and the
  stages before it in the walk; reactions against the walk go through
  `app.events` (see ARCHITECTURE.md).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The data's walk: a stage may import the kernel and the stages listed before it.
WALK = ["collection", "labeling", "quality", "export", "training", "registry"]
# Modules every stage may import, which import no stage.
KERNEL = {
    "app",
    "app.config",
    "app.db",
    "app.models",
    "app.errors",
    "app.security",
    "app.deps",
    "app.templating",
    "app.outbox",
    "app.runs",
    "app.charts",
    "app.events",
    "app.conversations",
    "app.vocabulary",
    "app.audit",
    "app.ratelimit",
}
# The bundled world is a library of its own (prompts, scorer, corpus): kernel rank too.
KERNEL_PACKAGES = ("app.world", "app.training.configs")
# What wires the stages together or fronts them all; may import any stage.
SHELL = {"app.main", "app.cli", "app.demo", "app.loop"}
SHELL_PACKAGES = ("app.accounts", "app.webhooks")
HEAVY = ("torch", "transformers", "peft", "accelerate", "safetensors", "worker")
# Composition roots that start the worker side on purpose (the `worker`, `beat` and `world pretrain` commands).
MAY_IMPORT_WORKER = {"app.cli"}


@dataclass
class Module:
    name: str
    path: Path
    imports: set[str] = field(default_factory=set)  # every imported module name, ours or not
    private: list[str] = field(default_factory=list)  # "line N: what"


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def build_graph(root: Path = ROOT) -> dict[str, Module]:
    """Parses app/ and worker/ and returns each module with what it imports."""
    paths = sorted(root.glob("app/**/*.py")) + sorted(root.glob("worker/**/*.py"))
    modules = {_module_name(p, root): Module(_module_name(p, root), p) for p in paths}
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), filename=str(module.path))
        aliases: dict[str, str] = {}  # local name -> our module it refers to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module.imports.add(alias.name)
                    if alias.name in modules:
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:  # `from app.quality import evaluations`
                        module.imports.add(full)
                        aliases[alias.asname or alias.name] = full
                    else:
                        module.imports.add(node.module)
                        if alias.name.startswith("_") and not alias.name.startswith("__") and node.module in modules:
                            module.private.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                module.private.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return modules


def _ours(modules: dict[str, Module], name: str) -> str | None:
    # `app.collection.batches.sampling_policy` was recorded as the module; walk up to a module we have.
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    """Returns our-module → our-modules edges (a package's own __init__ does not count as a dependency)."""
    out: dict[str, set[str]] = {}
    for module in modules.values():
        targets = {_ours(modules, name) for name in module.imports}
        out[module.name] = {t for t in targets if t and t != module.name}
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Returns the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def rank(name: str) -> float:
    """Where a module stands: kernel 0, the stages 1..n in walk order, the shell last; None-like for worker."""
    if name in KERNEL or name.startswith(KERNEL_PACKAGES):
        return 0
    if name in SHELL or name.startswith(SHELL_PACKAGES):
        return len(WALK) + 1
    parts = name.split(".")
    if parts[0] == "app" and len(parts) > 1 and parts[1] in WALK:
        return WALK.index(parts[1]) + 1
    if parts[0] == "worker":
        return len(WALK) + 2
    raise AssertionError(f"{name} belongs to no stage: add it to WALK, KERNEL or SHELL in {__file__}")


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return build_graph()


def test_there_are_no_import_cycles(modules):
    assert find_cycles(edges(modules)) == []


def test_no_module_imports_another_modules_private_names(modules):
    found = {m.name: m.private for m in modules.values() if m.private}
    assert found == {}


def test_the_web_process_never_imports_torch_or_the_worker(modules):
    graph = edges(modules)
    seen, todo = set(), ["app.main"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph[name])
    heavy = sorted(
        f"{name} imports {imported}"
        for name in seen
        for imported in modules[name].imports
        if imported.split(".")[0] in HEAVY
    )
    assert heavy == []
    assert "app.cli" not in seen


def test_only_the_cli_starts_the_worker_side(modules):
    offenders = sorted(
        f"{m.name} imports {i}"
        for m in modules.values()
        if m.name.startswith("app") and m.name not in MAY_IMPORT_WORKER
        for i in m.imports
        if i.split(".")[0] in HEAVY
    )
    assert offenders == []


def test_imports_flow_one_way_along_the_walk(modules):
    graph = edges(modules)
    backwards = sorted(
        f"{name} (rank {rank(name)}) imports {target} (rank {rank(target)})"
        for name, targets in graph.items()
        if name.startswith("app")
        for target in targets
        if rank(target) > rank(name) and not (name in MAY_IMPORT_WORKER and target.startswith("worker"))
    )
    assert backwards == []


def test_every_app_module_has_a_place_in_the_walk(modules):
    for name in modules:
        rank(name)  # raises for a module no rule covers


def test_no_module_is_over_600_lines(modules):
    long = {m.name: n for m in modules.values() if (n := len(m.path.read_text().splitlines())) > 600}
    assert long == {}


# --- the checker checks: each rule fails on a tree that breaks it ------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return build_graph(tmp_path)


def test_the_checker_finds_a_cycle_through_a_lazy_import(tmp_path):
    found = _tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/a.py": "from app import b\n",
            "app/b.py": "def f():\n    from app.a import g\n",
        },
    )
    assert find_cycles(edges(found)) == [["app.a", "app.b"]]


def test_the_checker_finds_private_names(tmp_path):
    found = _tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/a.py": "def _x(): pass\n",
            "app/b.py": "from app import a\nfrom app.a import _x\na._x()\n",
        },
    )
    assert found["app.b"].private == ["line 2: from app.a import _x", "line 3: app.a._x"]


def test_the_checker_ranks_a_backward_import(tmp_path):
    found = _tree(
        tmp_path,
        {
            "app/__init__.py": "",
            "app/collection/__init__.py": "",
            "app/registry/__init__.py": "",
            "app/collection/batches.py": "from app.registry import versions\n",
            "app/registry/versions.py": "",
        },
    )
    graph = edges(found)
    assert [t for t in graph["app.collection.batches"] if rank(t) > rank("app.collection.batches")] == [
        "app.registry.versions"
    ]
