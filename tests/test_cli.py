"""The command line: clear one-line errors with exit code 2, and nothing written on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from em_bench.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_task_lists_the_known_ones(capsys, tmp_path):
    code, _, err = _run(capsys, "run", "--task", "finanse", "--store", str(tmp_path / "s"))
    assert code == 2
    assert "finanse" in err and "finance" in err and "medical" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()  # nothing is created on bad input


def test_unknown_defense_fails_before_any_work(capsys, tmp_path):
    code, _, err = _run(capsys, "run", "--defense", "blockme", "--store", str(tmp_path / "s"))
    assert code == 2 and "blockme" in err and not (tmp_path / "s").exists()


def test_a_folder_that_is_not_a_store_is_left_alone(capsys, tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    code, _, err = _run(capsys, "run", "--store", str(tmp_path))
    assert code == 2 and "not an em-bench store" in err
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_unknown_organism_preset(capsys):
    code, _, err = _run(capsys, "organism", "build", "--name", "organisn")
    assert code == 2 and "organism" in err


def test_bad_seeds_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--seeds", "zero"])
    assert exit_.value.code == 2
    assert "--seeds takes integers" in capsys.readouterr().err


def test_tasks_lists_the_builtins(capsys):
    code, out, _ = _run(capsys, "tasks")
    names = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and {"base", "finance", "medical", "legal", "insecure_code"} <= set(names)


def test_tasks_validate_checks_folders_without_running(capsys, tmp_path):
    code, out, _ = _run(capsys, "tasks", "validate", str(Path(__file__).parents[1] / "tasks"))
    assert code == 0 and "task files valid" in out and "unlearn_safety" in out
    (tmp_path / "bad.yaml").write_text("name: bad\nin_domain: {domain: finance, targt: aligned}\n")
    code, _, err = _run(capsys, "tasks", "validate", str(tmp_path))
    assert code == 2 and f"{tmp_path / 'bad.yaml'}: " in err
    assert "in_domain.targt: unknown key (did you mean target?)" in err


def test_tasks_lists_where_each_task_comes_from(capsys, tmp_path):
    (tmp_path / "mine.yaml").write_text("name: mine\ndescription: my own base\n")
    code, out, _ = _run(capsys, "tasks", "--include", str(tmp_path))
    line = next(x for x in out.splitlines() if x.startswith("mine "))
    assert code == 0 and str(tmp_path) in line and "my own base" in line
    assert "built-in" in next(x for x in out.splitlines() if x.startswith("finance "))
