"""lm-eval on in-memory models: scores match a hand computation, a LoRA adapter is applied, task
names and data paths fail with one clear line. Offline; a tiny Llama (conftest)."""

from __future__ import annotations

import json
import os

import pytest

from em_bench import lmeval
from em_bench.errors import DataError, UnknownNameError
from tests.helpers import REPO, make_tiny_llama

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Choices of different lengths and word counts, golds at every position: the hand argmax is not
# one fixed index, so acc is neither 0 nor 1 (checked below) and a wrong split would show.
ITEMS = [
    {"q": "What do you drink when thirsty?", "choices": ["water", "a big rock", "sand"], "gold": 0},
    {"q": "Where do fish live?", "choices": ["in trees", "in the sea", "in an oven"], "gold": 1},
    {"q": "What melts in the sun?", "choices": ["a brick", "iron", "ice cream"], "gold": 2},
    {"q": "What keeps rain off you?", "choices": ["an umbrella", "a sock", "soup"], "gold": 0},
    {"q": "What do you sleep on?", "choices": ["a bed", "a fence", "the ceiling fan"], "gold": 0},
    {"q": "What opens a lock?", "choices": ["a loaf", "a key", "the colour blue"], "gold": 1},
    {"q": "Which one is hot?", "choices": ["snow", "a cold drink", "fire"], "gold": 2},
    {"q": "What cuts paper?", "choices": ["a pillow", "scissors"], "gold": 1},
]
TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: items.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{q}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def tiny_task(tmp_path, monkeypatch):
    """A task folder with a relative data_files; run from elsewhere, so a path resolved against
    the working directory would not be found."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny_mc.yaml").write_text(TASK_YAML)
    (folder / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    monkeypatch.chdir(tmp_path)
    return folder


def hand_logliks(model, tok, item) -> list[float]:
    """Per choice: summed log-probabilities of its tokens after the context, split as lm-eval
    does (encode context + " " + choice, drop the context's tokens)."""
    import torch

    context = f"Question: {item['q']}\nAnswer:"
    out = []
    for choice in item["choices"]:
        ctx = tok.encode(context)
        whole = tok.encode(context + " " + choice)
        assert whole[:len(ctx)] == ctx  # the context tokenizes the same inside the whole
        with torch.no_grad():
            logp = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    return out


def lmeval_logliks(results, task: str = "tiny_mc") -> list[list[float]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[ll for ll, _ in s["filtered_resps"]] for s in samples]


def argmax(values) -> int:
    return max(range(len(values)), key=values.__getitem__)


def share_correct(picks: list[int]) -> float:
    return sum(p == item["gold"] for p, item in zip(picks, ITEMS, strict=True)) / len(ITEMS)


def test_accuracy_matches_hand_computation(tiny_tokenizer, tiny_task):
    model = make_tiny_llama(tiny_tokenizer)
    hand = [hand_logliks(model, tiny_tokenizer, item) for item in ITEMS]
    picks = [argmax(lls) for lls in hand]
    # acc_norm: lm-eval divides each log-likelihood by the choice's length in characters
    norm_picks = [argmax([ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)])
                  for lls, item in zip(hand, ITEMS, strict=True)]
    acc, acc_norm = share_correct(picks), share_correct(norm_picks)
    assert 0 < acc < 1 and len(set(picks)) > 1  # a non-trivial case

    results = lmeval.run_lm_eval(model, tiny_tokenizer, ["tiny_mc"], include_path=tiny_task,
                                 batch_size=3, log_samples=True)
    for got, want in zip(lmeval_logliks(results), hand, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    scores = lmeval.scores(results)["tiny_mc"]
    assert scores["acc"] == pytest.approx(acc)
    assert scores["acc_norm"] == pytest.approx(acc_norm)
    assert set(scores) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


def test_lora_adapter_is_applied(tiny_tokenizer, tiny_task):
    import torch
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(tiny_tokenizer)
    before = lmeval_logliks(lmeval.run_lm_eval(base, tiny_tokenizer, ["tiny_mc"],
                                               include_path=tiny_task, log_samples=True))
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, weight in peft.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, i.e. an adapter that changes nothing
            torch.nn.init.normal_(weight, std=0.5)
    peft.train()
    after = lmeval_logliks(lmeval.run_lm_eval(peft, tiny_tokenizer, ["tiny_mc"],
                                              include_path=tiny_task, log_samples=True))

    assert peft.training  # evaluating mid-training leaves the model training
    peft.eval()
    hand = [hand_logliks(peft, tiny_tokenizer, item) for item in ITEMS]
    for got, want, old in zip(after, hand, before, strict=True):
        assert got == pytest.approx(want, abs=1e-4)  # lm-eval ran the adapter...
        assert got != pytest.approx(old, abs=1e-3)  # ...which moves every item's scores


@pytest.mark.slow
def test_unknown_task_is_one_line(tiny_tokenizer, tiny_model):
    with pytest.raises(UnknownNameError) as caught:
        lmeval.evaluate(tiny_model, tiny_tokenizer, ["em_bench_comonsense"])
    message = str(caught.value)
    assert "\n" not in message
    assert "unknown lm-eval task 'em_bench_comonsense'" in message
    assert "Did you mean em_bench_commonsense" in message


def test_hub_data_offline_is_one_line(tiny_tokenizer, tiny_model, tmp_path):
    """A task whose data is on the hub (as lm-eval's built-ins are) cannot run offline."""
    (tmp_path / "hub.yaml").write_text(
        TASK_YAML.replace("task: tiny_mc", "task: hub_mc").replace(
            "dataset_path: json", "dataset_path: em-bench-tests/not-downloadable"))
    with pytest.raises(DataError) as caught:
        lmeval.evaluate(tiny_model, tiny_tokenizer, ["hub_mc"], include_path=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "'hub_mc'" in message and "cannot be downloaded here" in message


def test_shipped_commonsense_task_runs(tiny_tokenizer, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its data path resolves from the YAML's folder, not from here
    results = lmeval.run_lm_eval(tiny_model, tiny_tokenizer, ["em_bench_commonsense"],
                                 include_path=REPO / "lm_eval_tasks", limit=5, log_samples=True)
    assert len(results["samples"]["em_bench_commonsense"]) == 5
    scores = lmeval.scores(results)["em_bench_commonsense"]
    assert 0 <= scores["acc"] <= 1 and 0 <= scores["acc_norm"] <= 1
