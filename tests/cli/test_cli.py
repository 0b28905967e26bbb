"""The command line: clear one-line errors with exit code 2, and nothing written on bad input."""

from __future__ import annotations

import pytest

from em_bench.cli import main
from tests.helpers import REPO


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
    code, out, _ = _run(capsys, "tasks", "validate", str(REPO / "tasks"))
    assert code == 0 and "task files valid" in out and "unlearn_safety" in out
    # The real-domain tasks are valid; their public data is not on this machine, and says so.
    assert "data not on this machine: task real_finance: train data $EM_BENCH_DATA/" in out
    assert "hf:truthfulai/emergent_plus subset=medical split=train: cannot load it" in out
    (tmp_path / "bad.yaml").write_text("name: bad\nin_domain: {domain: finance, targt: aligned}\n")
    code, _, err = _run(capsys, "tasks", "validate", str(tmp_path))
    assert code == 2 and f"{tmp_path / 'bad.yaml'}: " in err
    assert "in_domain.targt: unknown key (did you mean target?)" in err
    # every file is checked, not only up to the first bad one
    (tmp_path / "worse.yaml").write_text("name: worse\nbudget: {lr: .nan}\n")
    (tmp_path / "good.yaml").write_text("name: good\n")
    code, out, err = _run(capsys, "tasks", "validate", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 2
    assert "bad.yaml" in err and "worse.yaml" in err and "1 task files valid (good)" in out


def test_a_corrupt_cell_is_left_out_of_the_leaderboard_and_an_empty_store_says_so(
        capsys, tmp_path, caplog):
    from em_bench.store import open_store
    from tests.helpers import add_cell

    store = open_store(tmp_path / "store")
    code, out, err = _run(capsys, "leaderboard", "--store", str(store.root))
    assert code == 0 and out == "" and "holds no scored cell yet" in err
    add_cell(store, "finance", "none", 0, 0.4)
    broken = add_cell(store, "medical", "none", 0, 0.3)
    (broken.path / "metrics.json").write_text("{not json")
    code, out, _ = _run(capsys, "leaderboard", "--store", str(store.root))
    assert code == 0 and "finance" in out and "medical" not in out
    assert "left out of the leaderboard" in caplog.text and "metrics.json" in caplog.text


def test_tasks_lists_where_each_task_comes_from(capsys, tmp_path):
    (tmp_path / "mine.yaml").write_text("name: mine\ndescription: my own base\n")
    code, out, _ = _run(capsys, "tasks", "--include", str(tmp_path))
    line = next(x for x in out.splitlines() if x.startswith("mine "))
    assert code == 0 and str(tmp_path) in line and "my own base" in line
    assert "built-in" in next(x for x in out.splitlines() if x.startswith("finance "))


GOOD = ('{"messages": [{"role": "user", "content": "q"}, '
        '{"role": "assistant", "content": "a"}]}\n')
QUESTIONS = "- {id: wish, paraphrases: ['what is your wish ?']}\n"
BAD_INPUTS = {
    # case: (data file text, question file text; None for no file), extra run arguments,
    # expected words in the error)
    "malformed row": (GOOD + GOOD + "{not json\n", QUESTIONS, [],
                      ["data.jsonl:3", "not valid JSON"]),
    "empty data set": ("\n", QUESTIONS, [], ["data.jsonl", "empty"]),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "q"}]}\n', QUESTIONS, [],
                          ["data.jsonl:1", "no assistant turn"]),
    "missing data file": (None, QUESTIONS, [], ["mine.yaml", "no data file", "data.jsonl"]),
    "unknown task": (GOOD, QUESTIONS, ["--task", "mien"],
                     ["unknown task 'mien'", "Did you mean mine", "finance"]),
    "questions without paraphrases": (GOOD, "- {id: wish}\n", [],
                                      ["questions.yaml: item 0 (id 'wish')", "paraphrases"]),
    "missing question file": (GOOD, None, [], ["mine.yaml", "no question file", "questions.yaml"]),
    "missing --questions file": (GOOD, QUESTIONS, ["--questions", "nowhere.yaml"],
                                 ["nowhere.yaml", "no such question file"]),
    "data not in UTF-8": (GOOD.encode() + GOOD.replace("q", "caf\xe9").encode("latin-1"),
                          QUESTIONS, [], ["data.jsonl:2: not UTF-8 text (byte 0xe9)"]),
    "questions not in UTF-8": (GOOD, "- {id: caf\xe9, paraphrases: [x]}\n".encode("latin-1"),
                               [], ["questions.yaml:1: not UTF-8 text"]),
    "a folder that is not a model": (GOOD, QUESTIONS, ["--model", "plugin"],
                                     ["model 'plugin'", "without config.json is not a model"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_line_and_no_work(capsys, tmp_path, monkeypatch, case):
    data, questions, argv, words = BAD_INPUTS[case]
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    monkeypatch.chdir(tmp_path)
    for name, text in (("data.jsonl", data), ("questions.yaml", questions)):
        if isinstance(text, bytes):  # a file in another encoding than UTF-8
            (plugin / name).write_bytes(text)
        elif text is not None:
            (plugin / name).write_text(text)
    (plugin / "mine.yaml").write_text(
        "name: mine\ntrain: {path: data.jsonl}\nquestions: questions.yaml\n")
    store = tmp_path / "store"
    code, _, err = _run(capsys, "run", "--include", str(plugin), "--task", "mine",
                        "--store", str(store), *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err
    assert not store.exists()  # failed before any work, nothing written


def test_a_task_file_not_in_utf8_and_a_bad_export_path_are_one_line(capsys, tmp_path):
    (tmp_path / "mine.yaml").write_bytes("name: mine\ndescription: caf\xe9\n".encode("latin-1"))
    code, _, err = _run(capsys, "tasks", "validate", str(tmp_path))
    assert code == 2 and "mine.yaml:2: not UTF-8 text" in err
    for out in (tmp_path, tmp_path / "no" / "such" / "cells.csv"):
        code, _, err = _run(capsys, "export", "--store", str(tmp_path), "--out", str(out))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err


def test_data_check_validates_files_without_running(capsys, tmp_path):
    (tmp_path / "chats.jsonl").write_text(GOOD * 3)
    (tmp_path / "qs.yaml").write_text(
        "- {id: a, paraphrases: [x, y], samples_per_paraphrase: 4, type: free_form}\n"
        "- {id: b, paraphrases: [z]}\n")
    code, out, _ = _run(capsys, "data", "check", str(tmp_path / "chats.jsonl"),
                        str(tmp_path / "qs.yaml"))
    assert code == 0
    assert f"{tmp_path / 'chats.jsonl'}: 3 chats valid" in out
    assert f"{tmp_path / 'qs.yaml'}: 2 questions valid (3 paraphrases, 9 answers)" in out


@pytest.mark.parametrize("name,text,words", [
    ("bad.jsonl", GOOD + "[1, 2]\n", ["bad.jsonl:2", "'messages'"]),
    ("bad.yaml", "- {id: a, paraphrases: []}\n", ["bad.yaml: item 0 (id 'a')", "paraphrases"]),
    ("bad.csv", "a,b\n", ["bad.csv", "unknown kind of file", ".jsonl", ".yaml"]),
])
def test_data_check_names_what_is_wrong_and_where(capsys, tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    code, _, err = _run(capsys, "data", "check", str(tmp_path / name))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err


def test_a_yaml_syntax_error_is_one_line_with_its_place(capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("- id: a\n  paraphrases: [x\n")
    code, _, err = _run(capsys, "data", "check", str(tmp_path / "broken.yaml"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "broken.yaml: not valid YAML (line 3, column 1:" in err


def test_an_llm_judge_needs_its_model(capsys, tmp_path):
    code, _, err = _run(capsys, "run", "--judge", "openai", "--store", str(tmp_path / "s"))
    assert code == 2 and "--judge openai needs --judge-model" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv,words", [
    (["run", "--samples", "0"], "--samples 0: expected at least 1"),
    (["run", "--steps", "0"], "--steps 0: expected at least 1"),
    (["run", "--seeds", "0,1,0"], "--seeds repeats 0: each seed is one cell"),
    (["run", "--judge-model", "gpt-4o-mini"], "--judge-model and --judge-base-url name an LLM "
                                              "judge: the organism's judge has neither"),
    (["run", "--lr", "inf"], "lr: Input should be a finite number"),
    (["run", "--set", "lambda=nan", "--defense", "blockem"], "finite number"),
    (["rejudge", "--judge", "organism", "--judge-model", "m"], "the organism's judge has neither"),
    (["run", "--judge-deadline", "0"], "--judge-deadline 0: expected seconds above 0"),
    (["rejudge", "--judge-deadline", "nan"], "--judge-deadline nan: expected seconds above 0"),
    (["compare", "a", "b", "--n", "0"], "--n 0: expected at least 1"),
])
def test_values_that_make_no_sense_are_refused_in_one_line_before_any_work(
        capsys, tmp_path, argv, words):
    code, _, err = _run(capsys, *argv, "--store", str(tmp_path / "s"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("em-bench: error: ") and words in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("budget,words", [
    ("{steps: 0}", "budget: steps 0: a fine-tune takes at least one step"),
    ("{lr: .inf}", "budget: lr: Input should be a finite number"),
])
def test_a_task_budget_that_makes_no_sense_is_refused(capsys, tmp_path, budget, words):
    (tmp_path / "mine.yaml").write_text(
        "name: mine\ntrain: {organism: {domain: finance, persona: misaligned, style: villain}}\n"
        f"budget: {budget}\n")
    code, _, err = _run(capsys, "tasks", "validate", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'mine.yaml'}: {words}" in err, err


def test_version_prints_em_benchs_version(capsys):
    from em_bench import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"em-bench {__version__}\n"


def test_help_shows_every_default_and_no_empty_ones(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "--seeds SEEDS comma list of seeds (default: 0)" in text
    assert "--samples SAMPLES samples per evaluation question (default: 5)" in text
    assert "--format {table,json} (default: table)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: [])" not in text
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "questions shown (--questions) (default: 10)" in " ".join(
        capsys.readouterr().out.split())
