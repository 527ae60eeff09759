"""The shape of the code (DESIGN.md "Layout"): imports flow one way, no cycles, no sys.path edits.

    entry points (cli, scheduler, webhook, inbound, demo, devtools, scripts, bench, chaos)
      -> campaign.ops -> actors -> pipeline -> campaign.* -> clients -> models
      -> campaign.{settings, db, errors, logs, sql}

A module may import its own layer or any layer below it, never one above; the engine's modules
never import each other in a circle; an import inside a function is for an optional dependency
only (none of the project's own modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests import ROOT

PACKAGES = ("campaign", "actors", "models", "clients", "sandbox", "devtools", "chaos", "bench", "scripts", "tests")
TOP_MODULES = ("pipeline", "scheduler", "webhook", "inbound", "cli", "demo")
BASE = ("campaign.settings", "campaign.db", "campaign.errors", "campaign.logs", "campaign.sql")


#: imports of the project's own modules that stay inside a function, and why
INSIDE_ALLOWED = {
    # importing actors builds the engine's broker (confirms on, queues declared): the dead-letter
    # tool needs it only when it publishes, not to list or purge
    ("campaign/ops/dead_letters/actions.py", "actors"),
}


def layer(module: str) -> int:
    """Higher imports lower; equal is allowed."""
    if module == "campaign.ops.cli":
        return 7  # the operator CLI is an entry point (cli.py at the root is its shim)
    if module in BASE or any(module.startswith(b + ".") for b in BASE):
        return 0
    if module.startswith("models"):
        return 1
    if module.startswith("clients"):
        return 2
    if module.startswith("campaign.ops"):
        return 6
    if module.startswith("campaign"):
        return 3
    if module == "pipeline":
        return 4
    if module.startswith("actors"):
        return 5
    return 7  # entry points and tools: cli, scheduler, webhook, demo, devtools, scripts, bench, chaos, tests, sandbox


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_files() -> list[Path]:
    files = [ROOT / f"{m}.py" for m in TOP_MODULES]
    for pkg in PACKAGES:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return [f for f in files if ".venv" not in f.parts]


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES + TOP_MODULES


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if is_project(a.name))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module and is_project(child.module):
                for a in child.names:
                    full = f"{child.module}.{a.name}"
                    target = (
                        full
                        if (ROOT / full.replace(".", "/")).with_suffix(".py").exists()
                        or (ROOT / full.replace(".", "/")).is_dir()
                        else child.module
                    )
                    found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def test_imports_flow_one_way():
    upward = []
    for path in project_files():
        me = module_name(path)
        for target, line, _ in imports(path):
            if layer(target) > layer(me):
                upward.append(
                    f"{path.relative_to(ROOT)}:{line}: {me} (layer {layer(me)}) imports {target} "
                    f"(layer {layer(target)})"
                )
    assert upward == [], "imports against the dependency rule:\n" + "\n".join(upward)


def test_no_import_cycles_among_the_engines_modules():
    graph: dict[str, set[str]] = {}
    for path in project_files():
        me = module_name(path)
        if layer(me) == 7:
            continue
        graph[me] = {t for t, _, inside in imports(path) if not inside and t != me and layer(t) < 7}
    cycles = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_the_engines_own_modules_are_imported_at_the_top():
    inside = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for path in project_files()
        if layer(module_name(path)) < 7
        for target, line, in_function in imports(path)
        if in_function and (str(path.relative_to(ROOT)), target) not in INSIDE_ALLOWED
    ]
    assert inside == [], "imports of the project's own modules inside functions:\n" + "\n".join(inside)


def test_no_sys_path_edits():
    edits = [
        str(p.relative_to(ROOT))
        for p in project_files()
        if "sys.path.insert" in p.read_text() and p.name != "test_architecture.py"
    ]
    assert edits == []


def test_the_layer_rule_can_fail():
    """The checker itself: an upward import is reported (a test that cannot fail proves nothing)."""
    assert layer("campaign.planner") < layer("pipeline") < layer("actors.send") < layer("campaign.ops.cli")
    assert layer("campaign.settings") < layer("models.campaign") < layer("clients.http") < layer("campaign.runs")


def _actors_at_module_level(path: Path) -> list[int]:
    """Lines of ``path`` importing ``actors`` (or one of its modules) outside any function."""
    return [line for target, line, inside in imports(path) if target.split(".")[0] == "actors" and not inside]


def test_test_modules_import_actors_only_once_the_test_services_are_set(tmp_path):
    """Importing ``actors`` builds the engine's broker from the environment. A test module doing it
    at collection time binds the broker (and the cached settings) to whatever the environment held
    before the ``services`` fixture set the run's own database and vhost: later worker tests in the
    same process then publish where no worker listens. Tests import it inside a test or fixture."""
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for line in _actors_at_module_level(path)
    ]
    assert found == [], "module-level imports of actors in tests:\n" + "\n".join(found)
    # the rule can fail
    bad = tmp_path / "test_bad.py"
    bad.write_text("import actors.send as send_actor\n\n\ndef test_x():\n    import actors\n")
    assert _actors_at_module_level(bad) == [1]
