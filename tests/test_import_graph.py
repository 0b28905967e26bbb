"""scripts/import_graph.py on tiny packages whose graphs are worked out by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "import_graph.py"


def _script():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cycle_lazy_import_and_failing_rules(tmp_path):
    ig = _script()
    # board.rows -> board.results -(lazy)-> train -> board.rows: a cycle, and the board
    # reaches train, but only through the import inside load().
    root = _package(tmp_path / "em_bench", {
        "__init__.py": "",
        "board/__init__.py": "",
        "board/rows.py": "from em_bench.board import results\n",
        "board/results.py": "def load():\n    from em_bench.train import fit\n    return fit\n",
        "train.py": "import os\n\nfrom .board import rows\n",
    })
    graph = ig.build_graph(root)
    assert graph == {
        "em_bench": {},
        "em_bench.board": {},
        "em_bench.board.rows": {"em_bench.board.results": ig.Edge("top", 1)},
        "em_bench.board.results": {"em_bench.train": ig.Edge("lazy", 2)},
        "em_bench.train": {"em_bench.board.rows": ig.Edge("top", 3)},
    }
    loop = ["em_bench.board.results", "em_bench.train", "em_bench.board.rows"]
    assert ig.cycles({s: set(d) for s, d in graph.items()}) == [(sorted(loop), loop + loop[:1])]
    parts = ["board", "train"]
    assert ig.cycles(ig._adjacency(ig.part_graph(graph))) == [(parts, parts + parts[:1])]

    rules = ig.check_rules(graph)
    assert [ok for ok, _ in rules] == [False, False, False, True, True]
    assert rules[2][1][1:] == [
        "reaches train only through lazy imports: em_bench.board.results -(lazy)-> em_bench.train"
    ]
    assert ig.main(["--root", str(root), "--check", "--no-runtime"]) == 1
    assert ig.main(["--root", str(root), "--no-runtime"]) == 0


def test_package_init_relative_and_typing_imports(tmp_path):
    ig = _script()
    root = _package(tmp_path / "pkg", {
        "__init__.py": "",
        "sub/__init__.py": "from . import a\n",
        "sub/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import b\n",
        "b.py": "from pkg.sub.a import f\n",
    })
    # b importing pkg.sub.a runs pkg/sub/__init__.py first; a's own package does not count.
    assert ig.build_graph(root) == {
        "pkg": {},
        "pkg.sub": {"pkg.sub.a": ig.Edge("top", 1)},
        "pkg.sub.a": {"pkg.b": ig.Edge("typing", 3)},
        "pkg.b": {"pkg.sub.a": ig.Edge("top", 1), "pkg.sub": ig.Edge("top", 1, package_init=True)},
    }


def test_em_bench_itself_keeps_every_rule():
    ig = _script()
    rules = ig.check_rules(ig.build_graph(REPO / "em_bench"), "em_bench")
    assert [problems for ok, problems in rules if not ok] == []
