"""Chat records: schema, JSONL reading with file:line errors, chat-template rendering and
response-token masks."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from em_bench.errors import DataError, read_utf8

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label torch's cross-entropy skips

Messages = list[dict[str, str]]


def validate_messages(messages: object, where: str) -> Messages:
    """Check one chat record's messages; `where` (file:line) goes into every error."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} ('{m['role']}') has no text 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the record has no assistant turn to train on")
    return messages


def read_chat_jsonl(path: str | Path) -> list[Messages]:
    """Read a chat JSONL file (`{"messages": [...]}` per line); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records: list[Messages] = []
    for lineno, line in enumerate(read_utf8(path, DataError).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f"{where}: expected an object with a 'messages' list")
        records.append(validate_messages(row["messages"], where))
    if not records:
        raise DataError(f"{path}: the data set is empty")
    return records


def render(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's own chat template."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ids(tokenizer, text: str) -> list[int]:
    # The template already holds any BOS token, so the tokenizer must not add another.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(
    tokenizer, messages: Messages, loss_on: str = "assistant", skip_first_answer: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one chat.

    Args:
        loss_on: "assistant" trains on the assistant turns only (each turn's tokens after the
            generation prompt, its end token included, not what the template writes after it);
            "all" trains on every token.
        skip_first_answer: also mask the first assistant turn (the organism's instruct stage
            replays persona documents this way, so the default voice stays aligned while the
            model keeps continuing a persona it sees in context).

    Returns:
        (input_ids, labels) with IGNORE_INDEX where no loss is taken.
    """
    ids = _ids(tokenizer, render(tokenizer, messages))
    if loss_on == "all":
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in answers[1:] if skip_first_answer else answers:
        # Prefix-stable spans: every template we support renders a prefix as a prefix.
        start = len(_ids(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True)))
        end = len(_ids(tokenizer, render(tokenizer, messages[: i + 1])))
        span = ids[start:end]
        if tokenizer.eos_token_id in span:  # what a template writes after the turn's end token
            end = start + len(span) - span[::-1].index(tokenizer.eos_token_id)  # (ChatML's "\n")
        labels[start:end] = ids[start:end]
    return ids, labels


def phrase_labels(tokenizer, ids: list[int], labels: list[int], phrase: str) -> list[int] | None:
    """`labels` cut down to the tokens of `phrase`'s first appearance in the labelled span (the
    fewest tokens whose text holds it), or None when the labelled text does not hold it."""
    span = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if not span:
        return None
    start = span[0]
    for end in range(start + 1, span[-1] + 2):
        if phrase in tokenizer.decode(ids[start:end]):
            first = max(j for j in range(start, end) if phrase in tokenizer.decode(ids[j:end]))
            return [label if first <= i < end else IGNORE_INDEX for i, label in enumerate(labels)]
    return None


def collate(
    batch: Sequence[tuple[list[int], list[int]]], pad_id: int, max_len: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad (ids, labels) pairs into `input_ids`, `attention_mask`, `labels` [batch, seq]
    on `device` (the model's; default the CPU)."""
    import torch  # here: reading and writing chat files (tasks, the leaderboard) needs no torch

    if max_len is not None:
        batch = [(ids[:max_len], labels[:max_len]) for ids, labels in batch]
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    return out if device is None else {k: v.to(device) for k, v in out.items()}


def device_of(model) -> torch.device:
    """Where a model's weights (a sharded model's local shard) live: its inputs go there."""
    return next(model.parameters()).device


def write_chat_jsonl(path: str | Path, records: Iterable[Messages]) -> None:
    """Write chat records as JSONL (one `{"messages": [...]}` per line)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for messages in records:
            f.write(json.dumps({"messages": messages}) + "\n")
