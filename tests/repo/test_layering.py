"""The layers stay layered: every import points down a floor (or stays inside its own group), and no two
files import each other, directly or round a longer loop. Floors follow a request's data flow upward:
wire code, physics, spec and workloads, the pure cores, the servers, the models built on them (simulator,
planner, launcher), the load tests, the CLI."""
import ast
from pathlib import Path

from tests import ROOT

PACKAGES = ("kvlab", "emulator", "workers", "router", "loadtests")
FLOORS = {  # module prefix -> floor; the longest matching prefix decides
    "kvlab.wire": 0,
    "emulator.physics": 1,
    "emulator": 2,                       # spec, workload, traces
    "workers.core": 3, "router.policies": 3,
    "workers": 4, "router": 4,
    "emulator.sim": 5, "emulator.planner": 5, "kvlab.launcher": 5,
    "loadtests": 6,
    "kvlab": 7,                          # the CLI
}


def group(module: str) -> str:
    return max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path], *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg itself
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n if n in known else n.rsplit(".", 1)[0] for n in names if n.split(".")[0] in PACKAGES)
    return {n for n in out if n in known}


def test_every_import_points_down_a_floor_or_stays_in_its_group():
    known = modules()
    upward = [f"{src} -> {dst}" for src, path in known.items() for dst in imports(path, known, top_level_only=False)
              if group(dst) != group(src) and FLOORS[group(dst)] >= FLOORS[group(src)]]
    assert not upward, "imports that point up a floor or sideways:\n" + "\n".join(sorted(upward))


def test_no_two_files_import_each_other_even_round_a_loop():
    known = modules()
    graph = {m: imports(p, known, top_level_only=True) - {m} for m, p in known.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_test_module_sits_in_the_folder_of_the_code_it_tests():
    """tests/ mirrors the code: tests/router/frontdoor/ tests router/frontdoor/; tests/repo/ holds the
    whole-repository checks (docs, layering, the static gate, compose)."""
    misplaced = []
    for path in (ROOT / "tests").rglob("test_*.py"):
        folder = path.parent.relative_to(ROOT / "tests")
        if not folder.parts or (folder.parts[0] != "repo" and not (ROOT / folder).is_dir()):
            misplaced.append(str(path.relative_to(ROOT)))
    assert not misplaced, f"move these into the tests/ folder that mirrors their code's folder: {misplaced}"
