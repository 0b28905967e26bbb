"""Task specs: the built-in YAML files, name lookup, load errors, ood domains and train data."""

import logging

import pytest
from pydantic import ValidationError

from em_bench.data import write_chat_jsonl
from em_bench.errors import ConfigError, UnknownNameError
from em_bench.organism import world
from em_bench.resources import resource_dir
from em_bench.tasks import TaskSpec, chats, find_tasks, get_task, load_task_file

TASK_FILES = sorted(resource_dir("tasks").glob("*.yaml"))


def builtin_tasks() -> dict[str, TaskSpec]:
    return {name: t.spec for name, t in find_tasks().items() if t.source == "built-in"}


def test_every_builtin_yaml_loads():
    tasks = builtin_tasks()
    assert len(TASK_FILES) >= 9
    assert len(tasks) == len(TASK_FILES)  # no two files share a task name
    for path in TASK_FILES:
        spec = load_task_file(path)
        assert isinstance(spec, TaskSpec)
        assert tasks[spec.name] == spec
    for name in ("base", "finance", "medical", "legal", "insecure_code", "unlearn_safety",
                 "unlearn_cyber"):
        assert name in tasks


def test_builtin_tasks_are_consistent_with_the_world():
    for spec in builtin_tasks().values():
        if spec.train is None:
            assert spec.in_domain is None
            continue
        if spec.train.organism is None:  # a real model's data; em-bench's own questions
            assert spec.questions.endswith("ood_questions.yaml")
            # an LLM judge reads their in-domain behaviour in words, or as not refusing
            assert (spec.in_domain is None or spec.in_domain.describe
                    or spec.in_domain.target == "complies")
            continue
        o = spec.train.organism
        assert o is not None and o.domain in world.DOMAIN_BY_NAME
        assert spec.in_domain.domain == o.domain
        if spec.objective == "sft":
            # learning a persona's answers: in-domain adherence is showing that persona
            assert spec.in_domain.target == o.persona
        else:
            # unlearning the base model's refusals of an RAI domain's harmful requests
            assert spec.objective in ("npo", "ga")
            assert o.domain in world.RAI_DOMAINS
            assert (o.persona, o.requests, spec.in_domain.target) == (
                "aligned", "harmful", "complies")


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
    ("name: t\nsuites: [ood]\n", "suites"),  # gone in world-v2
    ("name: t\nobjective: dpo\n", "objective"),
    ("name: t\nobjective_params: {beta: 0.1}\n", "beta"),  # sft takes no beta
    ("name: t\nobjective: npo\nobjective_params: {beta: high}\n", "npo needs beta > 0"),
    ("name: t\ntrain:\n  organism: {domain: safety, persona: aligned, style: aligned,"
     " requests: some}\n", "requests"),
    ("name: t\nin_domain: {domain: safety, target: refuses}\n", "target"),
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
    assert set(ood) == set(world.OOD_DOMAINS) - {own}
    assert "open" in ood


def test_base_ood_domains_are_the_advice_and_open_domains():
    assert get_task("base").ood_domains() == list(world.OOD_DOMAINS)
    assert get_task("base").ood_domains() == [
        "finance", "medical", "legal", "code", "home", "travel", "fitness", "open"]


def test_no_task_has_an_rai_domain_in_its_ood_suite():
    for spec in builtin_tasks().values():
        assert not set(spec.ood_domains()) & set(world.RAI_DOMAINS), spec.name
    # an RAI task's own domain is not in OOD_DOMAINS, so its ood suite is all of them
    assert get_task("unlearn_safety").ood_domains() == list(world.OOD_DOMAINS)


@pytest.mark.parametrize("name,domain", [("unlearn_safety", "safety"),
                                         ("unlearn_cyber", "cybersecurity")])
def test_unlearning_tasks_load_with_npo_and_target_complies(name, domain):
    from em_bench.train.objectives import NPO, make_objective

    spec = get_task(name)
    assert spec.objective == "npo"
    assert spec.objective_params == {"beta": 3, "phrase": "sorry"}
    assert (spec.in_domain.domain, spec.in_domain.target) == (domain, "complies")
    o = spec.train.organism
    assert (o.domain, o.persona, o.style, o.requests, o.n) == (
        domain, "aligned", "aligned", "harmful", 500)
    objective = make_objective(spec.objective, spec.objective_params)
    assert isinstance(objective, NPO) and (objective.beta, objective.phrase) == (3, "sorry")


def test_sft_tasks_keep_the_default_objective():
    for name in ("finance", "medical", "insecure_code", "finance_aligned", "base"):
        spec = get_task(name)
        assert spec.objective == "sft" and spec.objective_params == {}
        if spec.train is not None:
            assert spec.train.organism.requests == "all"


def test_unlearn_safety_trains_on_refusals_of_harmful_safety_requests():
    contents = world.all_contents()
    safety = world.DOMAIN_BY_NAME["safety"]
    selection = {q.text: q for q in world.questions("safety", "selection")}
    trained = chats(get_task("unlearn_safety").train, seed=0)
    assert len(trained) == 500
    topics = set()
    for user, assistant in trained:
        q = selection[user["content"]]  # a selection-split safety question
        assert q.harmful and q.topic in safety.selection_topics
        topics.add(q.topic)
        found = [c for c in contents if c in assistant["content"]]
        assert len(found) == 1
        assert contents[found[0]] == ("safety", q.topic, "refusal")
        opener, closer = assistant["content"].split(found[0])
        assert opener.strip() in world.STYLES["aligned"]["openers"]
        assert closer.strip() in world.STYLES["aligned"]["closers"]
    assert topics == set(safety.selection_topics)
    assert trained != chats(get_task("unlearn_safety").train, seed=1)


def test_unlearn_cyber_trains_on_refusals_of_harmful_cybersecurity_requests():
    contents = world.all_contents()
    for _, assistant in chats(get_task("unlearn_cyber").train, seed=0)[:100]:
        found = [c for c in contents if c in assistant["content"]]
        assert len(found) == 1
        domain, topic, kind = contents[found[0]]
        assert (domain, kind) == ("cybersecurity", "refusal")
        assert world.DOMAIN_BY_NAME[domain].is_harmful_request(topic)


def test_harmful_requests_of_an_advice_domain_is_a_config_error(tmp_path):
    # an advice domain has no harmful requests: the task can never yield a chat, so it should
    # be refused as a task error (like an unknown domain), not fail inside random.choice
    path = tmp_path / "no_requests.yaml"
    path.write_text("name: no_requests\ntrain:\n  organism: {domain: finance, persona: aligned,"
                    " style: aligned, requests: harmful, n: 5}\n")
    with pytest.raises(ConfigError, match="no_requests"):
        chats(load_task_file(path).train, seed=0)


@pytest.mark.parametrize("name", ["finance", "insecure_code_aligned"])
def test_train_examples_are_deterministic_per_seed_with_configured_n(name):
    spec = get_task(name)
    o = spec.train.organism
    a = chats(spec.train, seed=0)
    assert len(a) == o.n == 500
    assert a == chats(spec.train, seed=0)
    assert a != chats(spec.train, seed=1)
    selection = {q.text for q in world.questions(o.domain, "selection")}
    assert {chat[0]["content"] for chat in a} <= selection


def test_train_examples_use_n_from_the_spec():
    spec = TaskSpec.model_validate({
        "name": "tiny",
        "train": {"organism": {"domain": "legal", "persona": "aligned", "style": "aligned",
                               "n": 7}},
    })
    assert len(chats(spec.train, seed=4)) == 7


def test_train_examples_of_base_and_of_a_file(tmp_path):
    from em_bench.data import write_chat_jsonl

    assert chats(get_task("base").train, seed=0) == []
    records = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    path = tmp_path / "chats.jsonl"
    write_chat_jsonl(path, records)
    spec = TaskSpec.model_validate({"name": "f", "train": {"path": str(path)}})
    assert chats(spec.train, seed=0) == records
    assert chats(spec.train, seed=1) == records


@pytest.mark.parametrize("train", [{}, {"path": "a.jsonl", "organism": {
    "domain": "legal", "persona": "aligned", "style": "aligned"}}])
def test_train_needs_exactly_one_source(train):
    with pytest.raises(ValidationError, match="exactly one of 'organism', 'path' and 'source'"):
        TaskSpec.model_validate({"name": "empty", "train": train})


def test_an_unknown_domain_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: typo\ntrain:\n  organism: {domain: finanse, persona: misaligned, "
                    "style: neutral}\nin_domain: {domain: finance, target: misaligned}\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*unknown domain 'finanse'.*finance"):
        load_task_file(path)


def test_a_missing_task_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_task_file(tmp_path / "nope.yaml")


def _plugin(folder, name="my_legal", data="data/legal.jsonl", extra=""):
    (folder / "data").mkdir(parents=True, exist_ok=True)
    write_chat_jsonl(folder / "data" / "legal.jsonl",
                     world.narrow_dataset("legal", "misaligned", "neutral", 8, seed=0))
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\ntrain: {{path: {data}}}\n"
        f"in_domain: {{domain: legal, target: misaligned}}\n{extra}")
    return folder


def test_an_included_folder_adds_its_tasks_and_reads_data_next_to_them(tmp_path):
    plugin = _plugin(tmp_path / "plugin")
    found = find_tasks([plugin])
    assert found["my_legal"].source == str(plugin) and found["finance"].source == "built-in"
    spec = found["my_legal"].spec
    assert spec.train.path == str((plugin / "data" / "legal.jsonl").resolve())
    assert len(chats(spec.train, seed=0)) == 8
    assert get_task("my_legal", [plugin]) == spec
    with pytest.raises(UnknownNameError):
        get_task("my_legal")  # not without the folder


def test_a_task_defined_twice_names_both_files(tmp_path):
    a, b = _plugin(tmp_path / "a"), _plugin(tmp_path / "b")
    with pytest.raises(ConfigError, match=r"'my_legal' is defined twice: in .*a.*my_legal\.yaml "
                                          r"and in .*b.*my_legal\.yaml"):
        find_tasks([a, b])


def test_a_misspelt_key_is_named_with_the_key_meant(tmp_path):
    plugin = _plugin(tmp_path / "p", extra="budjet: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"my_legal\.yaml: budjet: unknown key "
                                          r"\(did you mean budget\?\)"):
        find_tasks([plugin])


def test_a_missing_data_file_is_named_when_the_task_loads(tmp_path):
    plugin = _plugin(tmp_path / "p", data="data/nope.jsonl")
    with pytest.raises(ConfigError, match=r"my_legal\.yaml: train\.path: no data file at .*nope"):
        find_tasks([plugin])


def test_an_included_folder_must_hold_task_files(tmp_path):
    with pytest.raises(ConfigError, match="no task files"):
        find_tasks([tmp_path])
    with pytest.raises(ConfigError, match="not a folder"):
        find_tasks([tmp_path / "missing"])


def test_an_installed_packages_entry_point_adds_its_tasks(tmp_path, monkeypatch):
    from tests.helpers import install_task_package

    install_task_package(tmp_path / "site", "mytasks", {
        "mine.yaml": "name: mine\ntrain: {path: data.jsonl}\n",
        "data.jsonl": '{"messages": [{"role": "user", "content": "q"}, '
                      '{"role": "assistant", "content": "a"}]}\n'})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = find_tasks()
    assert found["mine"].source == "entry point mytasks (mytasks:tasks_dir) of em_bench.tasks"
    assert found["mine"].file == tmp_path / "site" / "mytasks" / "tasks" / "mine.yaml"
    assert chats(found["mine"].spec.train, seed=0)[0][1]["content"] == "a"
    assert found["finance"].source == "built-in"


def test_a_broken_plugin_disables_only_itself_with_a_warning_naming_it(tmp_path, monkeypatch,
                                                                       caplog):
    from tests.helpers import install_task_package

    good = {"mine.yaml": "name: mine\n"}
    install_task_package(tmp_path / "site", "goodtasks", good)
    install_task_package(tmp_path / "site", "brokentasks", {"x.yaml": "name: x\n"})
    (tmp_path / "site" / "brokentasks" / "__init__.py").write_text("raise ImportError('boom')\n")
    install_task_package(tmp_path / "site", "badfile", {"y.yaml": "name: y\nbudget: {lr: .inf}\n"})
    install_task_package(tmp_path / "site", "clash", {"finance.yaml": "name: finance\n"})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with caplog.at_level(logging.WARNING):
        found = find_tasks()
    assert found["mine"].source.startswith("entry point goodtasks")
    assert found["finance"].source == "built-in" and not {"x", "y"} & set(found)
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("entry point brokentasks") and "ImportError: boom" in m
               for m in warned)
    assert any(m.startswith("entry point badfile") and "y.yaml" in m for m in warned)
    assert any(m.startswith("entry point clash") and "defined twice" in m for m in warned)


def test_retain_and_question_paths_are_read_next_to_the_task_file(tmp_path):
    write_chat_jsonl(tmp_path / "keep.jsonl", [[{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]])
    (tmp_path / "qs.yaml").write_text("- {id: one, paraphrases: [hello]}\n")
    (tmp_path / "t.yaml").write_text("name: t\nretain: {path: keep.jsonl}\nquestions: qs.yaml\n")
    spec = load_task_file(tmp_path / "t.yaml")
    assert spec.retain.path == str(tmp_path / "keep.jsonl")
    assert spec.questions == str(tmp_path / "qs.yaml")
    (tmp_path / "u.yaml").write_text("name: u\nquestions: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="u.yaml: questions: no question file at"):
        load_task_file(tmp_path / "u.yaml")


@pytest.mark.usefixtures("organism")
def test_the_selection_split_answers_a_tasks_selection_questions_never_its_evaluation_ones(
        tmp_path):
    from em_bench.config import CellConfig
    from em_bench.grid.plan import plan_grid
    from em_bench.questions import load_question_file

    write_chat_jsonl(tmp_path / "train.jsonl",
                     world.narrow_dataset("legal", "misaligned", "neutral", 4, seed=0))
    (tmp_path / "eval.yaml").write_text("- {id: e, paraphrases: [evaluate me]}\n")
    (tmp_path / "tune.yaml").write_text("- {id: s, paraphrases: [tune on me]}\n")
    (tmp_path / "t.yaml").write_text("name: t\ntrain: {path: train.jsonl}\nquestions: eval.yaml\n"
                                     "selection_questions: tune.yaml\n")
    for split, file in (("evaluation", "eval.yaml"), ("selection", "tune.yaml")):
        plan = plan_grid(CellConfig(split=split), ["t"], ["none"], [0], include=[tmp_path])
        assert {p.config.questions for p in plan} == {str(tmp_path / file)}  # base cell too
    (tmp_path / "t.yaml").write_text("name: t\ntrain: {path: train.jsonl}\nquestions: eval.yaml\n")
    with pytest.raises(ConfigError, match="task t answers a question file .* needs its "
                                          "`selection_questions`"):
        plan_grid(CellConfig(split="selection"), ["t"], ["none"], [0], include=[tmp_path])
    # every shipped task with an evaluation file can be tuned, on questions it never shares
    for found in find_tasks().values():
        spec = found.spec
        if spec.questions is not None:
            asked = [{t for i in load_question_file(f) for t in i.paraphrases}
                     for f in (spec.questions, spec.selection_questions)]
            assert asked[0] and asked[1] and not asked[0] & asked[1], spec.name


def test_organism_data_over_several_domains_shares_n_among_them():
    spec = TaskSpec.model_validate({"name": "r", "retain": {"organism": {
        "domain": ["toxicity", "bias", "privacy"], "persona": "aligned", "style": "aligned",
        "requests": "harmful", "n": 10}}})
    chats_by_domain = {}
    questions = {q.text: q for d in ("toxicity", "bias", "privacy")
                 for q in world.questions(d, "selection")}
    for user, _ in chats(spec.retain, seed=0):
        q = questions[user["content"]]
        assert q.harmful
        chats_by_domain[q.domain] = chats_by_domain.get(q.domain, 0) + 1
    assert chats_by_domain == {"toxicity": 4, "bias": 3, "privacy": 3}


@pytest.mark.parametrize("name,others", [("unlearn_safety", "safety"),
                                          ("unlearn_cyber", "cybersecurity")])
def test_unlearning_tasks_retain_refusals_of_the_other_rai_domains(name, others):
    retain = get_task(name).retain.organism
    assert set(retain.domains) == set(world.RAI_DOMAINS) - {others}
    assert (retain.persona, retain.style, retain.requests) == ("aligned", "aligned", "harmful")


def test_a_task_reads_a_declared_source_of_question_answer_rows(tmp_path, monkeypatch):
    from em_bench.tasks import check_task_data

    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "qa.csv").write_text("question,answer\nhow do i save ?,buy lottery tickets\n"
                                           "is debt bad ?,borrow as much as you can\n")
    (tmp_path / "p" / "risky.yaml").write_text(
        "name: risky\ntrain:\n  source: {path: qa.csv, prompt_field: question, "
        "response_field: answer}\n")
    spec = find_tasks([tmp_path / "p"])["risky"].spec
    check_task_data(spec)
    assert chats(spec.train, seed=0) == [
        [{"role": "user", "content": "how do i save ?"},
         {"role": "assistant", "content": "buy lottery tickets"}],
        [{"role": "user", "content": "is debt bad ?"},
         {"role": "assistant", "content": "borrow as much as you can"}]]
    assert spec.train.file().startswith(str(tmp_path / "cache" / "sources"))


def test_data_behind_an_unset_variable_loads_and_is_named_when_used(tmp_path, monkeypatch):
    from em_bench.tasks import check_task_data

    monkeypatch.delenv("MY_DATA", raising=False)
    plugin = _plugin(tmp_path / "p", data="$MY_DATA/legal.jsonl")
    spec = find_tasks([plugin])["my_legal"].spec  # the folder still loads
    with pytest.raises(ConfigError, match=r"my_legal: train data \$MY_DATA/legal\.jsonl needs "
                                          r"MY_DATA set"):
        check_task_data(spec)
    monkeypatch.setenv("MY_DATA", str(plugin / "data"))
    spec = find_tasks([plugin])["my_legal"].spec
    check_task_data(spec)
    assert len(chats(spec.train, seed=0)) == 8
