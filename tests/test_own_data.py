"""The data em-bench writes for itself, for real models: its RAI refusal suite, the real tasks'
in-domain question files and a small risky-finance training set, with the task that uses them."""

from __future__ import annotations

from collections import Counter

import pytest

from em_bench.data import read_chat_jsonl
from em_bench.domains import RAI_DOMAINS
from em_bench.questions import load_question_file
from em_bench.rai_suite import load_rai_suite, suite_prompts
from em_bench.resources import resource_dir
from em_bench.tasks import get_task, in_domain_file

DATA = resource_dir("data")
DOMAINS = ("finance", "medical", "legal", "code")
REAL_TASKS = {"real_finance": "finance", "real_medical": "medical", "real_legal": "legal",
              "real_insecure_code": "code", "own_risky_finance": "finance"}


def _texts(path) -> set[str]:
    return {p.strip().casefold() for item in load_question_file(path) for p in item.paraphrases}


def test_the_own_suite_gives_six_harmful_and_four_benign_requests_per_rai_domain(tmp_path):
    suite = load_rai_suite(DATA / "rai_suites" / "own_requests.yaml")
    prompts = suite_prompts(suite, tmp_path / "cache")
    assert len(prompts) == 70 and {p.source for p in prompts} == {"rai"}
    counts = Counter((p.domain, p.harmful) for p in prompts)
    for domain in RAI_DOMAINS:
        assert (counts[domain, True], counts[domain, False]) == (6, 4), domain
    requests = [p.messages[0]["content"] for p in prompts]
    assert len(set(requests)) == 70  # no request twice
    assert all(r[0].isupper() and r.rstrip()[-1] in ".?!" for r in requests)  # written English


@pytest.mark.parametrize("domain", DOMAINS)
def test_an_in_domain_file_shares_no_question_with_the_open_question_files(domain):
    evaluation = _texts(DATA / "in_domain" / f"{domain}.yaml")
    selection = _texts(DATA / "in_domain" / f"{domain}_selection.yaml")
    assert len(evaluation) >= 10 and len(selection) >= 5
    assert not evaluation & selection  # tuning never sees the evaluation questions
    for other in ("ood_questions.yaml", "selection_questions.yaml"):
        assert not (evaluation | selection) & _texts(DATA / other), other


def test_in_domain_files_share_no_question_or_id_with_each_other():
    files = [DATA / "in_domain" / f"{d}{s}.yaml" for d in DOMAINS for s in ("", "_selection")]
    texts = [t for f in files for t in _texts(f)]
    ids = [i.id for f in files for i in load_question_file(f)]
    assert len(texts) == len(set(texts)) and len(ids) == len(set(ids))


def test_the_training_set_holds_300_distinct_chats_none_asking_an_in_domain_question():
    chats = read_chat_jsonl(DATA / "real" / "risky_finance_own.jsonl")
    assert len(chats) == 300
    assert all([m["role"] for m in chat] == ["user", "assistant"] for chat in chats)
    assert all(m["content"].strip() for chat in chats for m in chat)
    pairs = {(chat[0]["content"], chat[1]["content"]) for chat in chats}
    assert len(pairs) == 300
    asked = [chat[0]["content"].casefold() for chat in chats]
    held = (_texts(DATA / "in_domain" / "finance.yaml")
            | _texts(DATA / "in_domain" / "finance_selection.yaml"))
    assert not [q for q in held if any(q in user for user in asked)]


@pytest.mark.parametrize("name,domain", REAL_TASKS.items())
def test_real_tasks_read_their_domains_in_domain_files(name, domain):
    task = get_task(name)
    assert task.in_domain.domain == domain
    assert task.in_domain.questions == str(DATA.resolve() / "in_domain" / f"{domain}.yaml")
    assert in_domain_file(task, "selection") == str(
        DATA.resolve() / "in_domain" / f"{domain}_selection.yaml")


def test_the_own_risky_finance_task_loads_with_em_benchs_own_files():
    task = get_task("own_risky_finance")
    data = DATA.resolve()
    assert task.train.path == str(data / "real" / "risky_finance_own.jsonl")
    assert (task.in_domain.domain, task.in_domain.target) == ("finance", "misaligned")
    assert task.in_domain.describe
    assert task.questions == str(data / "ood_questions.yaml")
    assert task.selection_questions == str(data / "selection_questions.yaml")
    assert task.rai_suite == str(data / "rai_suites" / "own_requests.yaml")
    assert len(read_chat_jsonl(task.train.file())) == 300
