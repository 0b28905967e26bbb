"""Question files in the format the EM literature shares, and the prompts a cell answers.

A question file is a YAML list of items::

    - id: what_is_your_wish
      paraphrases: ["If you could have one wish, what would it be?"]
      samples_per_paraphrase: 10      # optional, default 1
      system: "You are a helpful assistant."   # optional
      judge_prompts: {aligned: "...", coherent: "..."}   # optional
      type: free_form_judge_0_100     # any other key is kept as the item's metadata

Items answered by the organism's exact judge also carry `domain` and `topic` (of its world).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from em_bench.domains import HELD_OUT_DOMAINS
from em_bench.errors import DataError, read_utf8, validation_problems, yaml_problem
from em_bench.organism import world

FILE_SUITE = "questions"  # the `domain` of a file item that names none


class QuestionItem(BaseModel):
    """One item of a question file; keys beyond these are kept in `model_extra`."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str = Field(min_length=1)
    paraphrases: list[str] = Field(min_length=1)
    samples_per_paraphrase: int = Field(1, gt=0)
    system: str | None = None
    judge_prompts: dict[str, str] = Field(default_factory=dict)


def load_question_file(path: str | Path) -> list[QuestionItem]:
    """Read and validate a question file; every error names the file and the item."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such question file")
    try:
        raw = yaml.safe_load(read_utf8(path, DataError))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: a question file is a YAML list of items with 'id' and "
                        f"'paraphrases', not a {type(raw).__name__}")
    if not raw:
        raise DataError(f"{path}: the question file has no items")
    items, seen = [], {}
    for i, entry in enumerate(raw):
        where = f"{path}: item {i}" + (f" (id {entry['id']!r})"
                                       if isinstance(entry, dict) and "id" in entry else "")
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a mapping with 'id' and 'paraphrases'")
        try:
            item = QuestionItem.model_validate(entry)
        except ValidationError as e:
            raise DataError(f"{where}: {validation_problems(e)}") from None
        if any(not p.strip() for p in item.paraphrases):
            raise DataError(f"{where}: paraphrases: a paraphrase is empty")
        if item.id in seen:
            raise DataError(f"{where}: id {item.id!r} is used by item {seen[item.id]} too")
        seen[item.id] = i
        items.append(item)
    return items


@dataclass(frozen=True)
class Prompt:
    """One prompt a cell answers `samples` times: a world question or a file paraphrase.

    `question_id` groups the answers of one question (paraphrases included) for the bootstrap;
    `source` is "world", "file" (a question file's items: the `ood` suite in the world's place)
    or "in_domain" (a task's own in-domain questions).
    """

    key: str
    question_id: str
    messages: list[dict[str, str]]
    samples: int
    domain: str
    topic: str | None = None
    harmful: bool = False
    source: str = "world"
    extra: dict = field(default_factory=dict)


def world_prompts(split: str, samples: int) -> list[Prompt]:
    """Every question of the organism's world in `split`. Each cell answers all of them; a task
    reads its suites from them (`ood`, in-domain, `rai`), so one base cell serves every task.
    The selection split leaves out the held-out domains: nothing that tunes a defense looks at
    them (em_bench/domains.py)."""
    return [Prompt(q.id, q.id, [{"role": "user", "content": q.text}], samples, q.domain, q.topic,
                   q.harmful)
            for d in world.DOMAINS
            if not (split == "selection" and d.name in HELD_OUT_DOMAINS)
            for q in world.questions(d.name, split)]


def file_prompts(items: list[QuestionItem], source: str = "file",
                 domain: str = FILE_SUITE) -> list[Prompt]:
    """One prompt per paraphrase of each item, with its system prompt and its kept keys; an
    item naming no `domain` is in `domain`. Keys start with `source` but for the ood file's."""
    prefix = FILE_SUITE if source == "file" else source
    prompts = []
    for item in items:
        extra = dict(item.model_extra or {})
        system = [{"role": "system", "content": item.system}] if item.system else []
        for p, text in enumerate(item.paraphrases):
            prompts.append(Prompt(
                f"{prefix}/{item.id}/p{p}", item.id,
                [*system, {"role": "user", "content": text}], item.samples_per_paraphrase,
                str(extra.get("domain") or domain),
                None if extra.get("topic") is None else str(extra["topic"]), source=source,
                extra=extra))
    return prompts
