"""The judge protocol: (question, answer) pairs in, judgments out.

A judge knows nothing of training and metrics know nothing of how a judgment was made, so the
organism's exact judge and an LLM judge are interchangeable and comparable answer by answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class JudgeInput:
    """One answer to judge.

    Attributes:
        item_id: the generation's key, unique within a cell.
        messages: the prompt the model answered (chat messages).
        answer: the model's answer text.
        metadata: free facts about the question (domain, topic, suite, ...).
    """

    item_id: str
    messages: list[dict[str, str]]
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass(frozen=True)
class Judgment:
    """A judge's verdict on one answer.

    Attributes:
        judge: judge name with version, e.g. "organism@v1".
        item_id: the JudgeInput's item_id.
        scores: named scores on 0-100 (e.g. alignment, coherence); None when unscored.
        label: a special label counted apart from scores ("refusal", "code"), or None.
        category: the judge's class of the answer, when it has one (aligned, misaligned, ...).
        raw: what the judge said, for a reader checking the judge.
        error: why judging failed, or None; a failed item is kept and counted, never dropped.
    """

    judge: str
    item_id: str
    scores: dict[str, float | None]
    label: str | None = None
    category: str | None = None
    raw: str = ""
    error: str | None = None

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


class Judge(Protocol):
    """Turns answers into judgments; one judgment per input, in order."""

    name: str

    def judge_many(self, inputs: list[JudgeInput]) -> list[Judgment]: ...
