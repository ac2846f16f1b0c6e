"""The package's import graph, read from its source (every `import` and `from ... import`, those inside functions
too), and the layer order its folders must keep: a module may import from its own folder and from the folders
below it, never from one above. `python tests/import_graph.py [PACKAGE_DIR]` prints the folders with their files and
lines, the floors (the longest chain of imports under each module), the circles and any import that climbs.
tests/test_layers.py fails on a circle or a climb, and on a docs/layout.md that misses a module."""

import ast
import sys
from collections import defaultdict
from pathlib import Path

# Bottom to top; "" is the package's own top level (the command line, its entry points and public names).
LAYERS = ("core", "nets", "data", "model", "sampling", "io", "training", "commands", "")
PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_lit"


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name imported from a package counts as that package's module
    when there is one by that name)."""
    mods = modules(package)
    edges = defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t if t in mods else node.module for t in targets]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name].update(t for t in targets if t in mods and t != name)
    return {name: edges[name] for name in mods}


def layer(module: str) -> str:
    """The folder a module lives in ("" for the top level)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def climbs(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a folder above the importing module's."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if rank.get(layer(b), len(LAYERS)) > rank.get(layer(a), len(LAYERS)))


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 0 for one that imports none of the package, else one above the highest it imports (the
    modules of a circle share one floor)."""
    group_of = {m: tuple(g) for g in circles(edges) for m in g}
    memo: dict[str, int] = {}

    def floor(m: str) -> int:
        if m not in memo:
            memo[m] = 0  # a circle's own members count as level with each other
            group = group_of.get(m, (m,))
            below = {t for g in group for t in edges.get(g, ()) if t not in group}
            memo[m] = 1 + max((floor(t) for t in below), default=-1)
            for g in group:
                memo[g] = memo[m]
        return memo[m]

    return {m: floor(m) for m in edges}


def main(package: Path = PACKAGE) -> None:
    edges, mods = graph(package), modules(package)
    by_folder = defaultdict(list)
    for name, path in mods.items():
        by_folder[layer(name)].append(path)
    print(f"{len(mods)} modules in {len(by_folder)} folders, {sum(len(p.read_text().splitlines()) for p in mods.values())} lines")
    for folder in sorted(by_folder, key=lambda f: LAYERS.index(f) if f in LAYERS else -1):
        lines = sum(len(p.read_text().splitlines()) for p in by_folder[folder])
        print(f"  {folder or '(top)':9} {len(by_folder[folder]):3} files {lines:5} lines")
    level = floors(edges)
    print(f"floors: {max(level.values()) + 1}")
    for f in range(max(level.values()) + 1):
        print(f"  {f:2}: {' '.join(sorted(m.removeprefix('diffusion_lit.') for m in level if level[m] == f))}")
    found = circles(edges)
    print(f"circles: {len(found)}" + "".join(f"\n  {' <-> '.join(g)}" for g in found))
    up = climbs(edges)
    print(f"imports that climb: {len(up)}" + "".join(f"\n  {a} -> {b}" for a, b in up))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE)
