"""The wheel carries what an installed em-bench reads at run time: tasks, judges, data, lm-eval
tasks and the shipped organism."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from tests.helpers import REPO


def test_a_wheel_built_from_the_repo_holds_tasks_judges_and_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(REPO)], check=True)
    (wheel,) = tmp_path.glob("em_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("tasks", "judges", "data", "lm_eval_tasks"):
        shipped = {f"em_bench/_resources/{f.relative_to(REPO)}"
                   for f in (REPO / folder).rglob("*") if f.is_file()}
        assert shipped and shipped <= names, folder
    assert "em_bench/_resources/leaderboard/schema.yaml" in names
    assert "em_bench/cli/__init__.py" in names
    organism = REPO / "em_bench" / "organism" / "shipped"
    built = {f"em_bench/organism/shipped/{f.relative_to(organism).as_posix()}"
             for f in organism.rglob("*") if f.is_file()}
    assert "em_bench/organism/shipped/organism/model.safetensors" in built <= names
    assert not any(".em-bench-test-cache" in n or n.startswith("tests/") for n in names)
