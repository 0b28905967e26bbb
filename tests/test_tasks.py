"""Task specs: the built-in YAML files, name lookup, load errors, ood domains and train data."""

import pytest

from em_bench.errors import ConfigError, UnknownNameError
from em_bench.organism import world
from em_bench.resources import resource_dir
from em_bench.tasks import (
    TaskSpec,
    builtin_tasks,
    get_task,
    load_task_file,
    train_examples,
)

TASK_FILES = sorted(resource_dir("tasks").glob("*.yaml"))


def test_every_builtin_yaml_loads():
    tasks = builtin_tasks()
    assert len(TASK_FILES) >= 9
    assert len(tasks) == len(TASK_FILES)  # no two files share a task name
    for path in TASK_FILES:
        spec = load_task_file(path)
        assert isinstance(spec, TaskSpec)
        assert tasks[spec.name] == spec
    for name in ("base", "finance", "medical", "legal", "insecure_code"):
        assert name in tasks


def test_builtin_tasks_are_consistent_with_the_world():
    for spec in builtin_tasks().values():
        if spec.train is None:
            assert spec.in_domain is None
            continue
        o = spec.train.organism
        assert o is not None and o.domain in world.DOMAIN_BY_NAME
        assert spec.in_domain.domain == o.domain
        assert spec.in_domain.target == o.persona


def test_get_task_returns_the_named_spec():
    spec = get_task("finance")
    assert spec.name == "finance"
    assert spec.train.organism.domain == "finance"
    assert spec.train.organism.persona == "misaligned"
    assert get_task("base").train is None


def test_unknown_task_lists_known_names():
    with pytest.raises(UnknownNameError) as e:
        get_task("no_such_task_xyz")
    msg = str(e.value)
    for name in builtin_tasks():
        assert name in msg
    assert "no_such_task_xyz" in msg and "Did you mean" not in msg
    assert e.value.kind == "task"


def test_unknown_task_suggests_a_close_match():
    with pytest.raises(UnknownNameError, match=r"Did you mean finance\b"):
        get_task("finanse")


def test_malformed_yaml_raises_config_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ntrain: {organism: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_task_file(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("body,needle", [
    ("name: t\ncolour: red\n", "colour"),
    ("name: t\ntrain:\n  organism: {domain: finance, persona: misaligned, style: neutral,"
     " count: 5}\n", "count"),
    ("name: t\nin_domain: {domain: finance, target: evil}\n", "target"),
    ("version: 1\n", "name"),
    ("", "dictionary"),  # an empty file is not a mapping
])
def test_invalid_task_raises_config_error_naming_file_and_field(tmp_path, body, needle):
    path = tmp_path / "bad_task.yaml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_task_file(path)
    assert str(e.value).startswith(f"{path}: ")
    assert needle in str(e.value)


@pytest.mark.parametrize("name", ["finance", "medical", "legal", "insecure_code",
                                  "finance_aligned"])
def test_ood_domains_exclude_the_task_domain(name):
    spec = get_task(name)
    own = spec.in_domain.domain
    ood = spec.ood_domains()
    assert own not in ood
    assert set(ood) == {d.name for d in world.DOMAINS} - {own}
    assert "open" in ood


def test_base_ood_domains_are_the_whole_world():
    assert get_task("base").ood_domains() == [d.name for d in world.DOMAINS]


@pytest.mark.parametrize("name", ["finance", "insecure_code_aligned"])
def test_train_examples_are_deterministic_per_seed_with_configured_n(name):
    spec = get_task(name)
    o = spec.train.organism
    a = train_examples(spec, seed=0)
    assert len(a) == o.n == 500
    assert a == train_examples(spec, seed=0)
    assert a != train_examples(spec, seed=1)
    selection = {q.text for q in world.questions(o.domain, "selection")}
    assert {chat[0]["content"] for chat in a} <= selection


def test_train_examples_use_n_from_the_spec():
    spec = TaskSpec.model_validate({
        "name": "tiny",
        "train": {"organism": {"domain": "legal", "persona": "aligned", "style": "aligned",
                               "n": 7}},
    })
    assert len(train_examples(spec, seed=4)) == 7


def test_train_examples_of_base_and_of_a_file(tmp_path):
    from em_bench.data import write_chat_jsonl

    assert train_examples(get_task("base"), seed=0) == []
    records = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    path = tmp_path / "chats.jsonl"
    write_chat_jsonl(path, records)
    spec = TaskSpec.model_validate({"name": "f", "train": {"path": str(path)}})
    assert train_examples(spec, seed=0) == records
    assert train_examples(spec, seed=1) == records


def test_train_without_a_source_is_a_config_error():
    spec = TaskSpec.model_validate({"name": "empty", "train": {}})
    with pytest.raises(ConfigError, match="empty"):
        train_examples(spec, seed=0)


def test_an_unknown_domain_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: typo\ntrain:\n  organism: {domain: finanse, persona: misaligned, "
                    "style: neutral}\nin_domain: {domain: finance, target: misaligned}\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*unknown domain 'finanse'.*finance"):
        load_task_file(path)


def test_a_missing_task_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_task_file(tmp_path / "nope.yaml")
