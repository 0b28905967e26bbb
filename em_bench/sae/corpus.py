"""The texts an SAE for any model is trained on: a file the user gives, or em-bench's own.

The default corpus is text the project writes itself: the `train` chats of the built-in tasks
(the organism world's selection-split answers, or a chat JSONL shipped beside a task file), at
most CHATS_PER_TASK of each, and em-bench's selection questions as user turns. It never holds
the evaluation questions (data/ood_questions.yaml) nor a held-out domain's text
(em_bench/domains.py): the headline EM is taken on those, so no SAE may be fitted to them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from em_bench.config import canonical_hash
from em_bench.data import Messages, read_chat_jsonl
from em_bench.domains import HELD_OUT_DOMAINS
from em_bench.errors import DataError, read_utf8

# Enough for ~1000 chats in all, the organism SAE's scale; more would only cost memory on a
# large model (every token's residual is kept in float32).
CHATS_PER_TASK = 100

TEXTS_HELP = ("a chat JSONL file (.jsonl: {\"messages\": [...]} per line, as a task's data; "
              "every token of each chat counts) or a plain text file (.txt: one text per line, "
              "each read as a user turn)")


def read_texts(path: str | Path) -> list[Messages]:
    """The texts of a --texts file as chats (see TEXTS_HELP); errors name the file and line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_chat_jsonl(path)
    if path.suffix != ".txt":
        raise DataError(f"{path}: texts must be {TEXTS_HELP}")
    if not path.is_file():
        raise DataError(f"{path}: no such text file")
    lines = read_utf8(path, DataError).split("\n")
    texts = [[{"role": "user", "content": line.strip()}] for line in lines if line.strip()]
    if not texts:
        raise DataError(f"{path}: the text file is empty")
    return texts


def _shipped_train_chats(task_file: Path) -> list[Messages]:
    """A built-in task's training chats when the project writes or ships them (not data the user
    downloads), at most CHATS_PER_TASK, none of a held-out domain."""
    from em_bench.tasks.spec import chats, load_task_file

    data = load_task_file(task_file).train
    if data is None or data.source is not None:
        return []
    if data.path is not None:
        # "$EM_BENCH_DATA/...": public data the user fetches, not the project's own
        return [] if "$" in data.path else read_chat_jsonl(data.path)[:CHATS_PER_TASK]
    if set(data.organism.domains) & set(HELD_OUT_DOMAINS):
        return []
    # n, not a slice: a task of several domains shares n out among them
    fewer = data.organism.model_copy(update={"n": min(data.organism.n, CHATS_PER_TASK)})
    return chats(data.model_copy(update={"organism": fewer}), seed=0)


def default_texts() -> list[Messages]:
    """em-bench's own chats (see the module docstring), in a fixed order, each once."""
    from em_bench.questions import file_prompts, load_question_file
    from em_bench.resources import resource_dir
    from em_bench.tasks.found import task_files

    texts = [chat for file in task_files(resource_dir("tasks"))
             for chat in _shipped_train_chats(file)]
    questions = load_question_file(resource_dir("data") / "selection_questions.yaml")
    texts += [prompt.messages for prompt in file_prompts(questions)]
    return unique(texts)


def unique(texts: Sequence[Messages]) -> list[Messages]:
    """`texts` with repeats dropped, in order: a text in both halves of the split would flatter
    the held-out quality."""
    seen: set[str] = set()
    kept = []
    for chat in texts:
        key = json.dumps(chat, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(chat)
    return kept


def texts_digest(texts: Sequence[Messages]) -> str:
    """A digest of the texts' content, for the SAE's cache key."""
    return canonical_hash({"texts": list(texts)})


def at_most(texts: Sequence[Messages], limit: int, seed: int) -> list[Messages]:
    """`texts`, or a seeded sample of `limit` of them in their own order when there are more."""
    if len(texts) <= limit:
        return list(texts)
    keep = sorted(random.Random(seed).sample(range(len(texts)), limit))
    return [texts[i] for i in keep]


def split_held_out(texts: Sequence[Messages], every: int) -> tuple[list[Messages], list[Messages]]:
    """(training texts, held-out texts): every `every`-th text is held out, so both halves
    span the whole corpus (the default one is ordered task by task)."""
    held = [t for i, t in enumerate(texts) if i % every == every - 1]
    return [t for i, t in enumerate(texts) if i % every != every - 1], held
