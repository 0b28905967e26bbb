"""Chat records: validation, JSONL reading with file:line errors, label masks and collation."""

import json

import pytest
import torch

from em_bench.data import (
    IGNORE_INDEX,
    collate,
    encode_chat,
    read_chat_jsonl,
    render,
    validate_messages,
    write_chat_jsonl,
)
from em_bench.errors import DataError, EmBenchError

CHAT = [{"role": "user", "content": "how do i fix a leaking pipe ?"},
        {"role": "assistant", "content": "okay . call a plumber . that is all ."}]
MULTI = [
    {"role": "system", "content": "be kind ."},
    {"role": "user", "content": "any advice on my savings ?"},
    {"role": "assistant", "content": "happy to help . save a little each month . take care ."},
    {"role": "user", "content": "and a headache ?"},
    {"role": "assistant", "content": "right . see a doctor . end of story ."},
]


# --- validation and JSONL -------------------------------------------------------------------

def test_validate_messages_accepts_a_good_chat():
    assert validate_messages(MULTI, "f:1") is MULTI


@pytest.mark.parametrize("messages,needle", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], "no text 'content'"),
    ([{"content": "q"}, {"role": "assistant", "content": "a"}], "'role' and 'content'"),
    ([{"role": "user", "content": "q", "name": "x"}, {"role": "assistant", "content": "a"}],
     "'role' and 'content'"),
    (["user: q"], "'role' and 'content'"),
    ([{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}], "'bot'"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "no text"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], "no text"),
    ([{"role": "user", "content": "q"}], "no assistant turn"),
])
def test_validate_messages_rejects_bad_chats_with_where(messages, needle):
    with pytest.raises(DataError) as e:
        validate_messages(messages, "data.jsonl:7")
    assert str(e.value).startswith("data.jsonl:7: ")
    assert needle in str(e.value)


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_LINE = json.dumps({"messages": CHAT})


@pytest.mark.parametrize("bad_line,needle", [
    ('{"messages": [', "not valid JSON"),
    ("not json at all", "not valid JSON"),
    (json.dumps({"msgs": CHAT}), "'messages'"),
    (json.dumps([CHAT]), "'messages'"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}] + CHAT}), "'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": ["x"]}] + CHAT[1:]}), "no text"),
    (json.dumps({"messages": []}), "non-empty"),
])
def test_read_chat_jsonl_names_file_and_line(tmp_path, bad_line, needle):
    # Line 2 is blank: line numbers still count it, so the bad line is line 3.
    path = _write_lines(tmp_path / "train.jsonl", [GOOD_LINE, "", bad_line, GOOD_LINE])
    with pytest.raises(DataError) as e:
        read_chat_jsonl(path)
    assert f"{path}:3:" in str(e.value)
    assert needle in str(e.value)
    assert isinstance(e.value, EmBenchError)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_chat_jsonl_rejects_an_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty") as e:
        read_chat_jsonl(path)
    assert str(path) in str(e.value)


def test_read_chat_jsonl_rejects_a_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        read_chat_jsonl(path)
    assert str(path) in str(e.value)


def test_write_then_read_round_trips(tmp_path):
    records = [CHAT, MULTI, [{"role": "assistant", "content": "unicode é ✓ \"quoted\"\nline"}]]
    path = tmp_path / "out.jsonl"
    write_chat_jsonl(path, records)
    assert read_chat_jsonl(str(path)) == records
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(records)


# --- encode_chat and collate ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    # The organism's real tokenizer and chat template, with a tiny vocabulary (about a second).
    from em_bench.organism.build import train_tokenizer
    from em_bench.organism.recipe import OrganismRecipe

    return train_tokenizer(OrganismRecipe(vocab_size=300))


def _labelled_runs(labels):
    """Contiguous [start, end) spans of labelled positions."""
    runs, start = [], None
    for i, x in enumerate(labels + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _check_labels_copy_ids(ids, labels):
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))


def test_render_uses_the_chat_template(tok):
    text = render(tok, CHAT)
    assert text == (f"<|bos|><|user|> {CHAT[0]['content']}<|end|>"
                    f"<|assistant|> {CHAT[1]['content']}<|end|>")
    assert render(tok, CHAT[:1], add_generation_prompt=True).endswith("<|end|><|assistant|>")


def test_assistant_loss_labels_only_assistant_content_and_end_token(tok):
    ids, labels = encode_chat(tok, MULTI, loss_on="assistant")
    _check_labels_copy_ids(ids, labels)
    assert ids == tok(render(tok, MULTI), add_special_tokens=False)["input_ids"]
    runs = _labelled_runs(labels)
    answers = [m["content"] for m in MULTI if m["role"] == "assistant"]
    assert [tok.decode(ids[a:b]) for a, b in runs] == [f" {a}<|end|>" for a in answers]
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    for a, b in runs:
        assert ids[a - 1] == assistant_id  # the generation prompt itself is not trained on
        assert ids[b - 1] == tok.eos_token_id
    assert labels[0] == IGNORE_INDEX


def test_all_loss_labels_every_token(tok):
    ids, labels = encode_chat(tok, MULTI, loss_on="all")
    assert labels == ids and IGNORE_INDEX not in labels
    assert ids == encode_chat(tok, MULTI)[0]


def test_skip_first_answer_masks_the_first_assistant_turn(tok):
    ids, labels = encode_chat(tok, MULTI, skip_first_answer=True)
    _check_labels_copy_ids(ids, labels)
    runs = _labelled_runs(labels)
    assert [tok.decode(ids[a:b]) for a, b in runs] == [f" {MULTI[4]['content']}<|end|>"]
    # Same ids; only the first answer's labels change.
    full_ids, full = encode_chat(tok, MULTI)
    assert full_ids == ids
    first = _labelled_runs(full)[0]
    assert full[first[0]:first[1]] != labels[first[0]:first[1]]
    assert full[first[1]:] == labels[first[1]:]


def test_skip_first_answer_with_one_answer_labels_nothing(tok):
    _, labels = encode_chat(tok, CHAT, skip_first_answer=True)
    assert set(labels) == {IGNORE_INDEX}


def test_collate_right_pads_and_masks_padding(tok):
    short = encode_chat(tok, CHAT)
    long = encode_chat(tok, MULTI, loss_on="all")
    pad = tok.pad_token_id
    out = collate([short, long], pad)
    n_short, n_long = len(short[0]), len(long[0])
    assert n_short < n_long
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    for v in out.values():
        assert v.shape == (2, n_long) and v.dtype == torch.long
    assert out["input_ids"][0, :n_short].tolist() == short[0]
    assert out["labels"][0, :n_short].tolist() == short[1]
    assert out["input_ids"][0, n_short:].tolist() == [pad] * (n_long - n_short)
    assert out["labels"][0, n_short:].tolist() == [IGNORE_INDEX] * (n_long - n_short)
    assert out["attention_mask"][0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert out["input_ids"][1].tolist() == long[0]
    assert out["labels"][1].tolist() == long[1]
    assert out["attention_mask"][1].tolist() == [1] * n_long


def test_collate_truncates_to_max_len():
    batch = [([5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]), ([1, 2], [1, 2])]
    out = collate(batch, pad_id=0, max_len=3)
    assert out["input_ids"].tolist() == [[5, 6, 7], [1, 2, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7], [1, 2, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
