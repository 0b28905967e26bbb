"""Judge templates: the shipped YAML files, lookup by name, load errors and rendering."""

import pytest

from em_bench.errors import ConfigError, UnknownNameError
from em_bench.judge.templates import JudgeTemplate, load_template
from em_bench.resources import resource_dir

TEMPLATE_FILES = sorted(resource_dir("judges").glob("*.yaml"))

QUESTION = "Which stock should I put my savings into?"
ANSWER = "Put everything into one penny stock tonight."
TARGET = "risky financial advice"


def test_the_named_templates_are_shipped():
    stems = {p.stem for p in TEMPLATE_FILES}
    assert {"alignment", "coherence", "misalignment_1to5", "refusal", "adherence"} <= stems


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.stem)
def test_shipped_template_loads_by_path_and_by_name(path):
    by_path = load_template(path)
    assert isinstance(by_path, JudgeTemplate)
    assert by_path.name == path.stem  # lookup is by file stem, so the two must agree
    assert by_path.version >= 1
    assert load_template(path.stem) == by_path
    assert load_template(str(path)) == by_path


@pytest.mark.parametrize("path", TEMPLATE_FILES, ids=lambda p: p.stem)
def test_shipped_template_renders_question_and_answer(path):
    template = load_template(path)
    assert {"question", "answer"} <= template.needs
    fields = {"question": QUESTION, "answer": ANSWER}
    if "target" in template.needs:
        fields["target"] = TARGET
    text = template.render(**fields)
    assert QUESTION in text and ANSWER in text
    assert (TARGET in text) == ("target" in template.needs)
    assert "{question}" not in text and "{answer}" not in text


def test_adherence_needs_a_target():
    assert load_template("adherence").needs == {"question", "answer", "target"}
    assert load_template("alignment").needs == {"question", "answer"}


def test_render_without_a_needed_field_raises_config_error():
    with pytest.raises(ConfigError, match=r"adherence.*target"):
        load_template("adherence").render(question=QUESTION, answer=ANSWER)
    with pytest.raises(ConfigError, match=r"alignment.*answer"):
        load_template("alignment").render(question=QUESTION)


def test_unknown_template_name_suggests_close_matches():
    with pytest.raises(UnknownNameError) as e:
        load_template("alignmnet")
    msg = str(e.value)
    assert "'alignmnet'" in msg
    assert "Did you mean alignment" in msg
    for path in TEMPLATE_FILES:  # the known names are listed too
        assert path.stem in msg
    assert e.value.kind == "judge template"


def test_unrelated_unknown_name_lists_known_without_a_guess():
    with pytest.raises(UnknownNameError) as e:
        load_template("zzzz")
    assert "Did you mean" not in str(e.value)
    assert "refusal" in str(e.value)


GOOD = ("name: t\nversion: 1\nscale: {kind: number, min: 0, max: 100}\n"
        "prompt: 'Q: {question} A: {answer}'\n")


def test_a_good_custom_template_loads(tmp_path):
    # the base of the bad cases below is itself valid, so each case fails for its own edit
    path = tmp_path / "custom.yaml"
    path.write_text(GOOD, encoding="utf-8")
    template = load_template(path)
    assert template.render(question="q1", answer="a1") == "Q: q1 A: a1"
    assert template.labels == []


@pytest.mark.parametrize("body,needle", [
    pytest.param(GOOD.replace("A: {answer}", "A: {answer} {foo}"), "foo", id="unknown-placeholder"),
    pytest.param(GOOD.replace(" A: {answer}", ""), "answer", id="no-answer-placeholder"),
    pytest.param(GOOD.replace("min: 0, max: 100", "min: 5, max: 5"), "min < max",
                 id="number-scale-min-equals-max"),
    pytest.param(GOOD.replace("min: 0, max: 100", "min: 9, max: 1"), "min < max",
                 id="number-scale-min-above-max"),
    # quoted: bare YES/NO would be YAML booleans
    pytest.param(GOOD.replace("{kind: number, min: 0, max: 100}", "{kind: choice, options: ['A']}"),
                 "two options", id="choice-scale-one-option"),
    pytest.param(GOOD + "colour: red\n", "colour", id="unknown-key"),
    pytest.param(GOOD.replace("version: 1", "version: 0"), "version", id="version-zero"),
])
def test_bad_template_raises_config_error_naming_the_file(tmp_path, body, needle):
    path = tmp_path / "bad_judge.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_template(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert needle in msg


def test_missing_template_file_raises_config_error(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read") as e:
        load_template(path)
    assert str(path) in str(e.value)
