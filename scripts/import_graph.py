"""Print the import graph of em_bench/, its cycles, and check its layering rules.

Usage: python scripts/import_graph.py [--check] [--dot] [--no-runtime] [--root DIR]

Every `import` counts, at module level or inside a function ("lazy": it runs only when the
function is called, but the code still depends on it). Imports under `if TYPE_CHECKING:` are
marked "typing". A "part" is a top-level module or a subpackage (train, judge, board, ...).
--check exits 1 when a rule fails. Standard library only; it reads the files, and imports the
package only to measure, in a subprocess, whether the leaderboard (board/) loads torch
(--no-runtime: not).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

RANK = {"top": 0, "lazy": 1, "typing": 2}  # which import wins when one module imports another twice


@dataclass(frozen=True)
class Edge:
    kind: str  # "top", "lazy" or "typing"
    line: int
    package_init: bool = False  # implied: importing pkg.sub runs pkg/__init__.py first

    def label(self) -> str:
        marks = ([] if self.kind == "top" else [self.kind]) + (["pkg init"] * self.package_init)
        return f" -({', '.join(marks)})-> " if marks else " -> "


Graph = dict[str, dict[str, Edge]]  # importer -> imported -> how


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name of every module under the package folder `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    name = getattr(test, "id", None) or getattr(test, "attr", None)  # or typing.TYPE_CHECKING
    return name == "TYPE_CHECKING"


def _imports(nodes, kind: str = "top"):
    """Yield (import node, kind) for every import among `nodes` and inside them."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, kind
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.body, "typing")
            yield from _imports(node.orelse, kind)
        else:  # a function body runs when called, not when its module is imported
            in_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            inner = "lazy" if in_function and kind == "top" else kind
            yield from _imports(ast.iter_child_nodes(node), inner)


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a module of ours (`from pkg.mod import func`)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_init: bool, modules) -> list[str]:
    if isinstance(node, ast.Import):
        return [t for a in node.names if (t := _known(a.name, modules))]
    base = node.module or ""
    if node.level:  # relative: "." is the module's own package
        package = module.split(".") if is_init else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    # `from pkg import sub` imports the module pkg.sub; `from pkg.mod import func` imports pkg.mod
    found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _known(base, modules)
             for a in node.names]
    return [t for t in found if t]


def build_graph(root: Path) -> Graph:
    """Parse every module under `root` and keep the imports that land inside the package."""
    modules = module_names(root)
    graph: Graph = {m: {} for m in modules}

    def add(src: str, dst: str, edge: Edge) -> None:
        old = graph[src].get(dst)
        if dst != src and (old is None or (RANK[edge.kind], edge.package_init)
                           < (RANK[old.kind], old.package_init)):
            graph[src][dst] = edge

    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, kind in _imports(tree.body):
            for dst in _targets(node, module, path.name == "__init__.py", modules):
                add(module, dst, Edge(kind, node.lineno))
    # Importing pkg.sub first runs pkg/__init__.py: an edge when that file imports something
    # (defenses/__init__.py loads every defense); not for the importer's own packages, nor the root.
    importing = {m for m, dsts in graph.items() if dsts}  # before this loop adds to it
    for src in list(graph):
        for dst, edge in list(graph[src].items()):
            parts = dst.split(".")
            for i in range(2, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg in importing and not (src + ".").startswith(pkg + "."):
                    add(src, pkg, Edge(edge.kind, edge.line, package_init=True))
    return graph


def part_of(module: str) -> str:
    """em_bench.train.loop -> train; em_bench.scoring -> scoring; em_bench -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def part_graph(graph: Graph) -> dict[tuple[str, str], list[tuple[str, str, Edge]]]:
    """(part, part) -> the module imports behind it."""
    parts: dict[tuple[str, str], list[tuple[str, str, Edge]]] = {}
    for src, dsts in graph.items():
        for dst, edge in dsts.items():
            if part_of(src) != part_of(dst):
                parts.setdefault((part_of(src), part_of(dst)), []).append((src, dst, edge))
    return dict(sorted(parts.items()))


def _adjacency(edges) -> dict[str, set[str]]:
    adj: dict[str, set[str]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set())
    return adj


def cycles(adj: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Every strongly connected component of more than one node, with one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while not scc or scc[-1] != v:
                scc.append(stack.pop())
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    result = []
    for scc in sorted(found):
        # The example is the shortest cycle in the component: the first one to cut.
        inside = {v: adj[v] & set(scc) for v in scc}
        paths = [shortest_path(inside, {w: [v, w] for w in inside[v]}, {v}) for v in scc]
        result.append((scc, min(paths, key=len)))
    return result


def both_ways(adj: dict[str, set[str]], scc: list[str]) -> list[str]:
    """The pairs of a component that import each other directly."""
    return [f"{a} <-> {b}" for a in scc for b in sorted(adj[a]) if a < b and a in adj[b]]


def shortest_path(adj, starts: dict[str, list[str]], goals: set[str]) -> list[str] | None:
    """Breadth-first search from paths already begun to any goal node."""
    queue, seen = deque(starts.values()), set(starts)
    while queue:
        path = queue.popleft()
        if path[-1] in goals:
            return path
        for w in sorted(adj.get(path[-1], ())):
            if w not in seen:
                seen.add(w)
                queue.append(path + [w])
    return None


def reach(graph: Graph, sources: list[str], prefix: str, kinds=("top", "lazy", "typing")):
    """The shortest import chain from `sources` to a module under `prefix`, along edges of kinds."""
    adj = {s: {d for d, e in dsts.items() if e.kind in kinds} for s, dsts in graph.items()}
    goals = {m for m in graph if m == prefix or m.startswith(prefix + ".")}
    return shortest_path(adj, {s: [s] for s in sources if s in graph}, goals)


def chain(graph: Graph, path: list[str]) -> str:
    text = path[0]
    for a, b in zip(path, path[1:], strict=False):
        text += graph[a][b].label() + b
    return text


def check_rules(graph: Graph, pkg: str = "em_bench") -> list[tuple[bool, list[str]]]:
    """The layering rules of issue 14: (passed, [the rule, then each offending chain])."""
    results = []
    module_cycles = cycles({s: set(d) for s, d in graph.items()})
    results.append((not module_cycles, [f"(1) no cycle between modules: {len(module_cycles)} found"]
                    + [chain(graph, p) for _, p in module_cycles]))
    part_cycles = cycles(_adjacency(part_graph(graph)))
    results.append((not part_cycles, [f"(2) no cycle between parts: {len(part_cycles)} found"]
                    + [" -> ".join(p) for _, p in part_cycles]))

    board = sorted(m for m in graph if part_of(m) == "board")
    problems = []
    for target in ("train", "generate"):
        # A chain of module-level imports is the worse news: importing the leaderboard runs it.
        eager = reach(graph, board, f"{pkg}.{target}", kinds=("top",))
        path = eager or reach(graph, board, f"{pkg}.{target}")
        if path:
            how = "at import time" if eager else "only through lazy imports"
            problems.append(f"reaches {target} {how}: {chain(graph, path)}")
    results.append((not problems, ["(3) the leaderboard side reaches neither train nor generate"]
                    + problems))

    # Direct imports, as the rule says; one through a third module shows up in the graph above.
    judge = [f"{s}{e.label()}{d}" for s, dsts in graph.items() for d, e in dsts.items()
             if part_of(s) == "generate" and part_of(d) == "judge"]
    results.append((not judge, ["(4) generate does not import judge"] + judge))

    cli = f"{pkg}.cli"
    users = [f"{s}{graph[s][cli].label()}{cli}" for s in graph
             if cli in graph[s] and s not in (cli, f"{pkg}.__main__")]
    results.append((not users, [f"(5) nothing below the CLI imports {cli}"] + users))
    return results


def torch_on_import(root: Path) -> str:
    """Whether importing the leaderboard loads torch, measured in a fresh interpreter."""
    code = (f"import sys, {root.name}.board.site, {root.name}.board.tables; "
            f"print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=root.parent, capture_output=True,
                         text=True, timeout=600)
    if run.returncode:
        return f"could not import ({(run.stderr.strip().splitlines() or ['?'])[-1]})"
    return run.stdout.strip()


def dot(graph: Graph) -> str:
    """Graphviz text of the part graph: label = module imports, dashed = only lazy, red = cycle."""
    parts = part_graph(graph)
    component = {v: i for i, (scc, _) in enumerate(cycles(_adjacency(parts))) for v in scc}
    lines = ["digraph em_bench {", "  rankdir=LR; node [shape=box];"]
    for (a, b), edges in parts.items():
        style = ["dashed"] if all(e.kind != "top" for _, _, e in edges) else []
        color = ["color=red"] if a in component and component[a] == component.get(b) else []
        attrs = ", ".join([f'label="{len(edges)}"'] + [f"style={s}" for s in style] + color)
        lines.append(f'  "{a}" -> "{b}" [{attrs}];')
    return "\n".join(lines + ["}"])


def report(graph: Graph, rules, torch: str | None, pkg: str = "em_bench") -> str:
    out = []
    kinds = Counter(e.kind for dsts in graph.values() for e in dsts.values())
    total = sum(kinds.values())
    out.append(f"== Modules: {len(graph)} modules, {total} imports ({kinds['top']} module-level, "
               f"{kinds['lazy']} lazy, {kinds['typing']} typing-only)")
    out.append("   a -> b: a imports b at module level; -(lazy)->: inside a function; "
               "-(pkg init)->: b is a package whose __init__ runs")
    for src, dsts in sorted(graph.items()):
        out += [f"{src}{edge.label()}{dst}" for dst, edge in sorted(dsts.items())]

    parts = part_graph(graph)
    out.append(f"\n== Parts: {len({p for pair in parts for p in pair})} parts, {len(parts)} edges "
               "(number of module imports behind each, lazy among them)")
    for (a, b), edges in parts.items():
        lazy = sum(e.kind != "top" for _, _, e in edges)
        out.append(f"{a} -> {b}: {len(edges)}" + (f" ({lazy} lazy)" if lazy else ""))

    module_cycles = cycles({s: set(d) for s, d in graph.items()})
    out.append(f"\n== Cycles between modules: {len(module_cycles)}")
    module_adj = {s: set(d) for s, d in graph.items()}
    for i, (scc, path) in enumerate(module_cycles, 1):
        out.append(f"{i}. {len(scc)} modules: {', '.join(scc)}\n   e.g. {chain(graph, path)}")
        out.append(f"   both ways: {', '.join(both_ways(module_adj, scc)) or 'none'}")

    part_cycles = cycles(_adjacency(parts))
    out.append(f"\n== Cycles between parts: {len(part_cycles)}")
    for i, (scc, path) in enumerate(part_cycles, 1):
        out.append(f"{i}. {len(scc)} parts: {', '.join(scc)}")
        out.append(f"   e.g. {' -> '.join(path)}, through:")
        for a, b in zip(path, path[1:], strict=False):  # one module import behind each step
            s, d, e = min(parts[a, b], key=lambda sde: (RANK[sde[2].kind], sde[0], sde[1]))
            out.append(f"      {s}:{e.line}{e.label()}{d}")
        out.append(f"   both ways: {', '.join(both_ways(_adjacency(parts), scc)) or 'none'}")

    out.append("\n== Rules")
    for ok, (rule, *chains) in rules:
        out += [f"{'PASS' if ok else 'FAIL'} {rule}"] + [f"     {c}" for c in chains]
    if torch is not None:  # a fact about the installed code, not a rule of the source
        out.append(f"MEASURED (6) importing the leaderboard ({pkg}.board) loads torch: {torch}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--root", type=Path, default=here / "em_bench",
                        help="the package folder (default: this repo's em_bench/)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a rule fails")
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot of the part graph")
    parser.add_argument("--no-runtime", action="store_true",
                        help="skip (6), the subprocess that imports the leaderboard")
    args = parser.parse_args(argv)
    graph = build_graph(args.root)
    rules = check_rules(graph, args.root.name)
    if args.dot:
        print(dot(graph))  # noqa: T201
    else:
        torch = None if args.no_runtime else torch_on_import(args.root)
        print(report(graph, rules, torch, args.root.name))  # noqa: T201
    return 1 if args.check and not all(ok for ok, _ in rules) else 0


if __name__ == "__main__":
    sys.exit(main())
